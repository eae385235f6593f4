"""Convert a Hugging Face Llama-family model to MLX and quantize it, with mlx-lm's converter.

4-bit with group size 64 turns CodeLlama-7B's 13.5 GB of float16 weights into about 3.8 GB,
which leaves a 32 GB Mac room to train. The output directory is built under a temporary
name and renamed into place, and records where it came from in provenance.json.
"""

import json
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import mlx_lm
from mlx_lm.convert import convert

from .errors import UserError
from .files import staged_directory
from .model import local_model_dir
from .shape import check_llama_family, read_model_config

PROVENANCE = "provenance.json"


def default_output(source: str, bits: Optional[int]) -> Path:
    suffix = f"{bits}bit" if bits else "mlx"
    return Path("models") / f"{Path(source.rstrip('/')).name}-{suffix}"


def convert_model(source: str, out: Optional[str | Path] = None, bits: Optional[int] = 4, group_size: int = 64,
                  dtype: str = "float16", revision: Optional[str] = None, force: bool = False) -> Path:
    """source: a Hugging Face repo id or a local Hugging Face model directory. bits=None keeps
    the weights unquantized in `dtype`."""
    if bits not in (None, 4, 8):
        raise UserError(f"--bits: {bits} is not supported; use 4 or 8 (or none for {dtype} weights)")
    if group_size not in (32, 64, 128):
        raise UserError(f"--group-size: {group_size} is not supported; use 32, 64 or 128")
    out = Path(out) if out else default_output(source, bits)
    if out.exists() and not force:
        raise UserError(f"{out}: already exists; choose another --out or pass --force to replace it")
    model_dir = local_model_dir(source, revision, download=True)
    check_llama_family(read_model_config(model_dir), f"{source}: config.json")

    with staged_directory(out, create=False) as staging:  # mlx-lm refuses an existing directory
        convert(str(model_dir), mlx_path=str(staging), quantize=bits is not None, q_bits=bits,
                q_group_size=group_size if bits else None, dtype=dtype)
        provenance = {
            "source": source,
            "local_source": str(model_dir),
            # A hub snapshot's directory name is the commit it was taken at.
            "revision": revision or (model_dir.name if "snapshots" in model_dir.parts else None),
            "bits": bits,
            "group_size": group_size if bits else None,
            "dtype": dtype,
            "converted_with": f"mlx-lm {mlx_lm.__version__}",
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        (staging / PROVENANCE).write_text(json.dumps(provenance, indent=2) + "\n")
        tokenizer_model = model_dir / "tokenizer.model"
        if tokenizer_model.exists() and not (staging / "tokenizer.model").exists():
            shutil.copy2(tokenizer_model, staging / "tokenizer.model")
    return out
