"""Convert a base model to an MLX model directory that mlx-lm, training, planning, generation
and every export take: from Hugging Face (`hf.py`), a GGUF file (`gguf.py`), or a model Ollama
has pulled (`ollama:NAME[:TAG]`, found by `ollama.py`, then converted as a GGUF file). Each
output directory records where it came from in provenance.json."""

from pathlib import Path
from typing import Callable, Optional

from ..backend import HALF_PRECISION_SLOWDOWN, default_convert_dtype, on_cpu_backend
from ..config import ConvertConfig
from ..console import alternatives
from ..errors import UserError
from ..files import replace_problem
from ..model import PRESET_SOURCES, converted_folder, looks_like_local_path
from . import gguf, hf, ollama

__all__ = ["convert_model", "source_kind"]


def source_kind(source: str) -> str:
    """'ollama', 'gguf' (any file: a GGUF model is one file, an Ollama blob has no extension)
    or 'hf' (a repo id or a Hugging Face model directory)."""
    if source.startswith(ollama.PREFIX):
        return "ollama"
    return "gguf" if Path(source).expanduser().is_file() else "hf"


def convert_model(source: str, out: Optional[str | Path] = None, bits: Optional[int] = ConvertConfig.bits,
                  group_size: int = ConvertConfig.group_size,
                  dtype: Optional[str] = None, revision: Optional[str] = None, force: bool = False,
                  progress: bool = True, log: Callable[[str], None] = print) -> Path:
    """bits=None keeps every weight unquantized in `dtype` (default: what trains fastest on this
    MLX backend). From a GGUF file, tensors already in Q4_0, Q4_1 or Q8_0 keep their own 4 or 8
    bits (group size 32) whenever `bits` is set."""
    if bits is not None and bits not in ConvertConfig.BITS:
        raise UserError(f"--bits: {bits} is not supported; use {alternatives(ConvertConfig.BITS)}, or none to keep "
                        "the weights unquantized")
    if group_size not in ConvertConfig.GROUP_SIZES:
        raise UserError(f"--group-size: {group_size} is not supported; use {alternatives(ConvertConfig.GROUP_SIZES)}")
    if dtype is not None and dtype not in ConvertConfig.DTYPES:
        raise UserError(f"--dtype: {dtype} is not supported; use {alternatives(ConvertConfig.DTYPES)}")
    kind = source_kind(source)
    if kind == "hf" and looks_like_local_path(source) and not Path(source).expanduser().exists():
        raise UserError(f"SOURCE: {source} does not exist; give a Hugging Face repo id (such as "
                        f"{next(iter(PRESET_SOURCES.values()))}), a local Hugging Face model folder, a .gguf file "
                        f"or {ollama.PREFIX}NAME")
    if kind != "hf" and revision:
        raise UserError(f"--revision: applies to Hugging Face repo ids, not to {source}")
    if kind != "hf" and (problem := gguf.tokenizer_reader_problem(source)):
        raise UserError(problem)
    model = ollama.find_model(source[len(ollama.PREFIX):]) if kind == "ollama" else None
    chosen_dtype = dtype or default_convert_dtype()
    if out is None:
        if model:
            name = model.short_name
        elif kind == "gguf":
            name = Path(source).expanduser().stem
        else:
            name = Path(source.rstrip("/")).name
        out = converted_folder(name, bits, chosen_dtype)
    out = Path(out)
    if out.exists() and not force:
        raise UserError(f"{out}: already exists; choose another --out or pass --force to replace it")
    source_path = model.blob if model else Path(source).expanduser()
    if problem := replace_problem(out, [source_path] if source_path.exists() else [], folder=True):
        raise UserError(problem)
    if dtype is None:
        dtype = chosen_dtype
        if on_cpu_backend():
            log(f"MLX runs on the CPU here: writing the unquantized parts in float32, which trains about "
                f"{HALF_PRECISION_SLOWDOWN}x faster here than float16 (--dtype to choose)")
    if model:
        return gguf.convert(model.blob, out, bits, group_size, dtype, source, progress,
                            {"ollama_manifest": str(model.manifest), "ollama_digest": model.digest})
    if kind == "gguf":
        return gguf.convert(Path(source).expanduser(), out, bits, group_size, dtype, source, progress)
    return hf.convert(source, out, bits, group_size, dtype, revision, progress)
