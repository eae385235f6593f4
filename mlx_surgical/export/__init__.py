"""Exporters: one module per consumer (mlx-lm, PEFT, llama.cpp GGUF, fused MLX model).

Each reads a run directory (or an mlx export) through `adapter.read_adapter` and writes its
own format; `export_adapter` picks one by name. Only the fused model needs MLX, so the others
also run in processes that never load it (the server).
"""

import shutil
from pathlib import Path
from typing import Optional

from ..adapter import read_adapter
from ..errors import UserError
from ..files import replace_problem
from . import gguf, mlx, peft

FORMATS = ("mlx", "peft", "gguf", "fused")
WRITERS = {"mlx": mlx.write, "peft": peft.write, "gguf": gguf.write}
SUFFIXES = {"gguf": ".gguf"}  # a format written as one file, not a folder


def export_adapter(adapter_dir: str | Path, fmt: str, out: Optional[str | Path] = None,
                   base_model: Optional[str] = None, dequantize: bool = False, force: bool = False) -> Path:
    """Write `adapter_dir` in format `fmt` to `out` (default: <adapter_dir>/export-<fmt>)."""
    if fmt not in FORMATS:
        raise UserError(f"--format: unknown format '{fmt}'; choose from {', '.join(FORMATS)}")
    adapter = read_adapter(adapter_dir)
    out = Path(out) if out else Path(adapter_dir) / f"export-{fmt}{SUFFIXES.get(fmt, '')}"
    if out.exists() and not force:
        raise UserError(f"{out}: already exists; choose another --out or pass --force to replace it")
    reads = [Path(adapter_dir)] + ([Path(base_model)] if base_model and Path(base_model).exists() else [])
    if problem := replace_problem(out, reads, folder=fmt != "gguf"):
        raise UserError(problem)
    if fmt == "fused":
        from . import fused  # loads MLX and the base model: imported only when asked for

        return fused.write(adapter, out, base_model=base_model, dequantize=dequantize)
    return WRITERS[fmt](adapter, out)


def export_archive(adapter_dir: str | Path, fmt: str, scratch: Path) -> Path:
    """A zip of `adapter_dir` exported in one of the formats that need no base model (WRITERS),
    written in `scratch`, which the caller removes when the archive has been sent."""
    if fmt not in WRITERS:
        raise UserError(f"format: unknown format '{fmt}'; choose {', '.join(WRITERS)}")
    name = f"{Path(adapter_dir).name}-{fmt}"
    out = export_adapter(adapter_dir, fmt, scratch / (name + SUFFIXES.get(fmt, "")))
    return Path(shutil.make_archive(str(scratch / name), "zip", root_dir=out.parent, base_dir=out.name))
