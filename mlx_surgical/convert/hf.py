"""Convert a Hugging Face Llama-family model to MLX and quantize it, with mlx-lm's converter.

4-bit with group size 64 turns CodeLlama-7B's 13.5 GB of float16 weights into about 3.8 GB,
which leaves a 32 GB Mac room to train.
"""

import contextlib
import io
import json
import shutil
from pathlib import Path
from typing import Optional

import mlx_lm
from mlx_lm.convert import convert as mlx_lm_convert

from ..console import working
from ..files import staged_directory
from ..model import local_model_dir, mlx_lm_rope
from ..provenance import Provenance, is_hub_snapshot
from ..rundir import now
from ..shape import check_llama_family, read_model_config


def convert(source: str, out: Path, bits: Optional[int], group_size: int, dtype: str, revision: Optional[str],
            progress: bool) -> Path:
    """source: a Hugging Face repo id or a local Hugging Face model directory. bits=None keeps
    the weights unquantized in `dtype`."""
    model_dir = local_model_dir(source, revision, download=True, where="SOURCE")
    config = read_model_config(model_dir)
    check_llama_family(config, f"{source}: config.json")
    rope = mlx_lm_rope(config, f"{source}: config.json")

    what = f"{bits}-bit" if bits else f"{dtype}"
    with staged_directory(out, create=False) as staging:  # mlx-lm refuses an existing directory
        # mlx-lm's own [INFO] lines would break the status line; it says the same.
        with working(f"converting {source} to {what} MLX weights in {out}", progress), \
                contextlib.redirect_stdout(io.StringIO()):
            mlx_lm_convert(str(model_dir), mlx_path=str(staging), quantize=bits is not None, q_bits=bits,
                           q_group_size=group_size if bits else None, dtype=dtype)
        # mlx-lm copies the config as it found it; state RoPE the way mlx-lm reads it.
        written = staging / "config.json"
        written.write_text(json.dumps({**json.loads(written.read_text()), **rope}, indent=4))
        Provenance(
            source=source,
            local_source=str(model_dir.resolve()),
            # A hub snapshot's directory name is the commit it was taken at.
            revision=revision or (model_dir.name if is_hub_snapshot(model_dir) else None),
            bits=bits,
            group_size=group_size if bits else None,
            dtype=dtype,
            converted_with=f"mlx-lm {mlx_lm.__version__}",
            created=now(),
        ).write(staging)
        tokenizer_model = model_dir / "tokenizer.model"
        if tokenizer_model.exists() and not (staging / "tokenizer.model").exists():
            shutil.copy2(tokenizer_model, staging / "tokenizer.model")
    return out
