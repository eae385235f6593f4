"""Exporters: one module per consumer (mlx-lm, PEFT, llama.cpp GGUF, fused MLX model).

Each reads a run directory (or an mlx export) through `adapter.py` and writes its own format;
`export_adapter` picks one by name."""

from pathlib import Path
from typing import Optional

from ..errors import UserError

FORMATS = ("mlx", "peft", "gguf", "fused")


def export_adapter(adapter_dir: str | Path, fmt: str, out: Optional[str | Path] = None,
                   base_model: Optional[str] = None, dequantize: bool = False, force: bool = False) -> Path:
    """Write `adapter_dir` in format `fmt` to `out` (default: <adapter_dir>/export-<fmt>)."""
    from . import fused, gguf, mlx, peft
    from .adapter import read_adapter, refuse_existing

    if fmt not in FORMATS:
        raise UserError(f"--format: unknown format '{fmt}'; choose from {', '.join(FORMATS)}")
    adapter = read_adapter(adapter_dir)
    default_name = f"export-{fmt}" + (".gguf" if fmt == "gguf" else "")
    out = Path(out) if out else Path(adapter_dir) / default_name
    refuse_existing(out, force)
    if fmt == "mlx":
        return mlx.write(adapter, out)
    if fmt == "peft":
        return peft.write(adapter, out)
    if fmt == "gguf":
        return gguf.write(adapter, out)
    return fused.write(adapter, out, base_model=base_model, dequantize=dequantize)
