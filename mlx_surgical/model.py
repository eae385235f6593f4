"""Find, describe and load a base model: a local directory or a Hugging Face repo id.

Loading goes through mlx-lm (`mlx_lm.utils.load`), which reads both MLX and Hugging Face
layouts and quantized weights. This module adds what a fine-tuning run needs around it:
the Llama-family check, the shape of the model without loading weights, and a
fingerprint an adapter records so that it is never applied to a different base.
"""

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .errors import UserError

LLAMA_FAMILY = ("llama", "mistral")


@dataclass(frozen=True)
class ModelShape:
    """What plan, surgery and the exporters need to know about a model, read from config.json."""

    model_type: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    head_dim: int
    tie_word_embeddings: bool = False
    quant_bits: Optional[int] = None
    quant_group_size: Optional[int] = None

    @classmethod
    def from_config(cls, config: dict, source: str = "config.json") -> "ModelShape":
        try:
            heads = config["num_attention_heads"]
            quant = config.get("quantization") or config.get("quantization_config") or {}
            return cls(
                model_type=config.get("model_type", "?"),
                hidden_size=config["hidden_size"],
                intermediate_size=config["intermediate_size"],
                num_layers=config["num_hidden_layers"],
                num_heads=heads,
                num_kv_heads=config.get("num_key_value_heads") or heads,
                vocab_size=config["vocab_size"],
                head_dim=config.get("head_dim") or config["hidden_size"] // heads,
                tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
                quant_bits=quant.get("bits"),
                quant_group_size=quant.get("group_size"),
            )
        except KeyError as e:
            raise UserError(f"{source}: missing {e.args[0]}; is this a Llama-family model config?") from None

    def projection_dims(self, name: str) -> tuple[int, int]:
        """(in, out) features of a decoder-layer projection by its short name."""
        q_out, kv_out = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return {
            "q_proj": (self.hidden_size, q_out),
            "k_proj": (self.hidden_size, kv_out),
            "v_proj": (self.hidden_size, kv_out),
            "o_proj": (q_out, self.hidden_size),
            "gate_proj": (self.hidden_size, self.intermediate_size),
            "up_proj": (self.hidden_size, self.intermediate_size),
            "down_proj": (self.intermediate_size, self.hidden_size),
        }[name]

    @property
    def parameter_count(self) -> int:
        per_layer = sum(i * o for i, o in map(self.projection_dims, (
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))) + 2 * self.hidden_size
        head = 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size
        return self.vocab_size * self.hidden_size + self.num_layers * per_layer + self.hidden_size + head

    def fingerprint(self) -> str:
        """Identifies the architecture an adapter fits: equal for a model and its quantized
        conversions, different for any other shape."""
        keys = ("model_type", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                "num_kv_heads", "vocab_size", "head_dim")
        canonical = json.dumps({k: getattr(self, k) for k in keys}, sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def describe(self) -> str:
        quant = f", {self.quant_bits}-bit" if self.quant_bits else ""
        return (f"{self.model_type} {self.num_layers} layers x hidden {self.hidden_size}, "
                f"{self.num_heads}/{self.num_kv_heads} heads, vocab {self.vocab_size}{quant}")


def is_local(path: str) -> bool:
    return Path(path).expanduser().exists()


def local_model_dir(path: str, revision: Optional[str] = None, download: bool = True) -> Path:
    """A local directory for `path`: itself when it exists, else a Hugging Face snapshot.
    With download=False only an already-cached snapshot is used."""
    if is_local(path):
        return Path(path).expanduser()
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError
    from mlx_lm.utils import DEFAULT_ALLOW_PATTERNS

    try:
        return Path(snapshot_download(path, revision=revision, allow_patterns=DEFAULT_ALLOW_PATTERNS,
                                      local_files_only=not download))
    except HFValidationError:
        raise UserError(f"model.path: '{path}' is neither a local directory nor a Hugging Face repo id") from None
    except Exception as e:  # offline, missing repo, gated model: all end the same way for the user
        how = "download it first or give a local directory" if not download else "check the name and your network"
        raise UserError(f"model.path: cannot get '{path}' from the Hugging Face Hub ({type(e).__name__}); {how}") from None


def read_model_config(model_dir: Path) -> dict:
    path = model_dir / "config.json"
    if not path.exists():
        raise UserError(f"{model_dir}: no config.json; give a Hugging Face or MLX model directory")
    return json.loads(path.read_text())


def check_llama_family(config: dict, source: str) -> None:
    model_type = config.get("model_type")
    if model_type not in LLAMA_FAMILY:
        raise UserError(f"{source}: model_type is '{model_type}', but mlx_surgical supports Llama-family models "
                        f"({', '.join(LLAMA_FAMILY)}), such as CodeLlama")


def model_shape(path: str, revision: Optional[str] = None, download: bool = False) -> ModelShape:
    """The shape from config.json alone, without loading weights."""
    model_dir = local_model_dir(path, revision, download=download)
    config = read_model_config(model_dir)
    check_llama_family(config, str(model_dir / "config.json"))
    return ModelShape.from_config(config, str(model_dir / "config.json"))


def load_tokenizer(path: str, revision: Optional[str] = None):
    from mlx_lm.utils import load_tokenizer as mlx_load_tokenizer

    return mlx_load_tokenizer(local_model_dir(path, revision, download=False))


@dataclass
class LoadedModel:
    model: object
    tokenizer: object
    shape: ModelShape
    path: Path


def load_model(path: str, revision: Optional[str] = None, dtype: str = "auto") -> LoadedModel:
    """Load weights and tokenizer with mlx-lm, after the Llama-family check."""
    import mlx.core as mx
    from mlx_lm.utils import load

    model_dir = local_model_dir(path, revision, download=True)
    config = read_model_config(model_dir)
    check_llama_family(config, str(model_dir / "config.json"))
    model, tokenizer = load(str(model_dir))
    if dtype != "auto":
        model.set_dtype(getattr(mx, dtype))
    return LoadedModel(model, tokenizer, ModelShape.from_config(config), model_dir)
