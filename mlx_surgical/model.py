"""Find and load a base model: a local directory or a Hugging Face repo id.

Loading goes through mlx-lm (`mlx_lm.utils.load`), which reads both MLX and Hugging Face
layouts and quantized weights; this module adds the Llama-family check before it and the
model's shape (shape.py) beside it.
"""

import json
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


def mlx_lm_rope(config: dict, source: str) -> dict:
    """The RoPE settings in the form mlx-lm reads (`rope_theta`, `rope_scaling`) that `config`
    lacks. transformers 5 writes only `rope_parameters`, which mlx-lm 0.32 ignores: it would
    silently rotate with theta 10,000 (SmolLM2 needs 100,000, CodeLlama 1,000,000). Returns
    {} when nothing is missing; refuses a config whose two forms disagree."""
    params = config.get("rope_parameters")
    if not params:
        return {}
    if not isinstance(params, dict) or "rope_theta" not in params:
        raise UserError(f"{source}: rope_parameters has no rope_theta; state rope_theta in config.json")
    theta = float(params["rope_theta"])
    rope_type = params.get("rope_type", "default")
    scaling = None if rope_type == "default" else {k: v for k, v in params.items() if k != "rope_theta"}
    if "rope_theta" in config and float(config["rope_theta"]) != theta:
        raise UserError(f"{source}: rope_theta {config['rope_theta']} disagrees with rope_parameters.rope_theta "
                        f"{theta:g}; remove one of them")
    stated = config.get("rope_scaling")
    if stated is not None:
        stated_type = stated.get("rope_type", stated.get("type"))
        if stated_type != rope_type or stated.get("factor") != params.get("factor"):
            raise UserError(f"{source}: rope_scaling {json.dumps(stated)} disagrees with rope_parameters "
                            f"{json.dumps(params)}; remove one of them")
    fixes = {} if "rope_theta" in config else {"rope_theta": theta}
    if scaling is not None and stated is None:
        fixes["rope_scaling"] = scaling
    return fixes


def with_mlx_lm_rope(config: dict, source: str) -> dict:
    """`config` with its RoPE settings stated as mlx-lm reads them (for every config we write)."""
    return {**config, **mlx_lm_rope(config, source)}


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
    """Load weights and tokenizer with mlx-lm, after the Llama-family check, with RoPE settings
    that only transformers 5's form states passed to mlx-lm as it reads them."""
    model_dir = local_model_dir(path, revision, download=True)
    config = read_model_config(model_dir)
    check_llama_family(config, str(model_dir / "config.json"))
    model, tokenizer = load(str(model_dir), model_config=mlx_lm_rope(config, str(model_dir / "config.json")))
    if dtype != "auto":
        model.set_dtype(getattr(mx, dtype))
    return LoadedModel(model, tokenizer, ModelShape.from_config(config), model_dir)
