"""Find and load a base model: a local directory or a Hugging Face repo id.

Loading goes through mlx-lm (`mlx_lm.utils.load`), which reads both MLX and Hugging Face
layouts and quantized weights; this module adds the Llama-family check before it and the
model's shape (shape.py) beside it.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import mlx.core as mx
from huggingface_hub import snapshot_download
from huggingface_hub.errors import HFValidationError
from mlx_lm.utils import DEFAULT_ALLOW_PATTERNS, load
from mlx_lm.utils import load_tokenizer as mlx_load_tokenizer

from .errors import UserError
from .shape import ModelShape, check_llama_family, local_shape, read_model_config


def is_local(path: str) -> bool:
    return Path(path).expanduser().exists()


def local_model_dir(path: str, revision: Optional[str] = None, download: bool = True) -> Path:
    """A local directory for `path`: itself when it exists, else a Hugging Face snapshot.
    With download=False only an already-cached snapshot is used."""
    if is_local(path):
        return Path(path).expanduser()
    try:
        return Path(snapshot_download(path, revision=revision, allow_patterns=DEFAULT_ALLOW_PATTERNS,
                                      local_files_only=not download))
    except HFValidationError:
        raise UserError(f"model.path: '{path}' is neither a local directory nor a Hugging Face repo id") from None
    except Exception as e:  # offline, missing repo, gated model: all end the same way for the user
        how = "download it first or give a local directory" if not download else "check the name and your network"
        raise UserError(f"model.path: cannot get '{path}' from the Hugging Face Hub ({type(e).__name__}); {how}") from None


def model_shape(path: str, revision: Optional[str] = None, download: bool = False) -> ModelShape:
    """The shape from config.json alone, without loading weights."""
    return local_shape(local_model_dir(path, revision, download=download))


def load_tokenizer(path: str, revision: Optional[str] = None):
    return mlx_load_tokenizer(local_model_dir(path, revision, download=False))


@dataclass
class LoadedModel:
    model: object
    tokenizer: object
    shape: ModelShape
    path: Path


def load_model(path: str, revision: Optional[str] = None, dtype: str = "auto") -> LoadedModel:
    """Load weights and tokenizer with mlx-lm, after the Llama-family check."""
    model_dir = local_model_dir(path, revision, download=True)
    config = read_model_config(model_dir)
    check_llama_family(config, str(model_dir / "config.json"))
    model, tokenizer = load(str(model_dir))
    if dtype != "auto":
        model.set_dtype(getattr(mx, dtype))
    return LoadedModel(model, tokenizer, ModelShape.from_config(config), model_dir)
