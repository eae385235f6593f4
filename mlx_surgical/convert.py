"""Convert a Hugging Face Llama-family model to MLX and quantize it, with mlx-lm's converter.

4-bit with group size 64 turns CodeLlama-7B's 13.5 GB of float16 weights into about 3.8 GB,
which leaves a 32 GB Mac room to train. The unquantized parts (norms, and everything with
--bits none) are float16 for Metal and float32 on MLX's CPU backend, the only dtype its
matmuls run fast in. The output directory is built under a temporary name and renamed into
place, and records where it came from in provenance.json.
"""

import contextlib
import io
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional

import mlx_lm
from mlx_lm.convert import convert

from .backend import HALF_PRECISION_SLOWDOWN, default_convert_dtype
from .console import working
from .errors import UserError
from .files import staged_directory
from .forward import on_cpu_backend
from .model import local_model_dir
from .provenance import Provenance, is_hub_snapshot
from .shape import check_llama_family, read_model_config


def default_output(source: str, bits: Optional[int]) -> Path:
    suffix = f"{bits}bit" if bits else "mlx"
    return Path("models") / f"{Path(source.rstrip('/')).name}-{suffix}"


def convert_model(source: str, out: Optional[str | Path] = None, bits: Optional[int] = 4, group_size: int = 64,
                  dtype: Optional[str] = None, revision: Optional[str] = None, force: bool = False,
                  progress: bool = True, log: Callable[[str], None] = print) -> Path:
    """source: a Hugging Face repo id or a local Hugging Face model directory. bits=None keeps
    the weights unquantized in `dtype` (default: what trains fastest on this MLX backend)."""
    if dtype is None:
        dtype = default_convert_dtype()
        if on_cpu_backend():
            log(f"MLX runs on the CPU here: writing the unquantized parts in float32, which trains about "
                f"{HALF_PRECISION_SLOWDOWN}x faster here than float16 (--dtype to choose)")
    if bits not in (None, 4, 8):
        raise UserError(f"--bits: {bits} is not supported; use 4 or 8 (or none for {dtype} weights)")
    if group_size not in (32, 64, 128):
        raise UserError(f"--group-size: {group_size} is not supported; use 32, 64 or 128")
    out = Path(out) if out else default_output(source, bits)
    if out.exists() and not force:
        raise UserError(f"{out}: already exists; choose another --out or pass --force to replace it")
    model_dir = local_model_dir(source, revision, download=True)
    check_llama_family(read_model_config(model_dir), f"{source}: config.json")

    what = f"{bits}-bit" if bits else f"{dtype}"
    with staged_directory(out, create=False) as staging:  # mlx-lm refuses an existing directory
        # mlx-lm's own [INFO] lines would break the status line; it says the same.
        with working(f"converting {source} to {what} MLX weights in {out}", progress), \
                contextlib.redirect_stdout(io.StringIO()):
            convert(str(model_dir), mlx_path=str(staging), quantize=bits is not None, q_bits=bits,
                    q_group_size=group_size if bits else None, dtype=dtype)
        Provenance(
            source=source,
            local_source=str(model_dir.resolve()),
            # A hub snapshot's directory name is the commit it was taken at.
            revision=revision or (model_dir.name if is_hub_snapshot(model_dir) else None),
            bits=bits,
            group_size=group_size if bits else None,
            dtype=dtype,
            converted_with=f"mlx-lm {mlx_lm.__version__}",
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        ).write(staging)
        tokenizer_model = model_dir / "tokenizer.model"
        if tokenizer_model.exists() and not (staging / "tokenizer.model").exists():
            shutil.copy2(tokenizer_model, staging / "tokenizer.model")
    return out
