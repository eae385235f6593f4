"""What an adapter, a plan and an exporter need to know about a base model, read from its
config.json without loading weights: the Llama-family check, the projection shapes, and a
fingerprint an adapter records so that it is never applied to a different base.

Nothing here imports MLX (model.py loads models).
"""

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .errors import UserError, parse_user_json, read_user_text

# Short projection names and where they live inside a Llama decoder layer, in the order
# every table and report lists them.
PROJECTION_PATHS = {
    "q_proj": "self_attn.q_proj",
    "k_proj": "self_attn.k_proj",
    "v_proj": "self_attn.v_proj",
    "o_proj": "self_attn.o_proj",
    "gate_proj": "mlp.gate_proj",
    "up_proj": "mlp.up_proj",
    "down_proj": "mlp.down_proj",
}
PROJECTIONS = tuple(PROJECTION_PATHS)

LLAMA_FAMILY = ("llama", "mistral")
# What an adapter depends on: equal for a model and its quantized conversions.
FINGERPRINT_KEYS = ("model_type", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                    "num_kv_heads", "vocab_size", "head_dim")


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

    def __post_init__(self):
        sizes = ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "vocab_size", "head_dim")
        bad = [name for name in sizes if type(getattr(self, name)) is not int or getattr(self, name) < 1]
        if bad:
            raise ValueError(f"{', '.join(bad)} must be positive whole numbers")

    @classmethod
    def from_config(cls, config: dict, source: str = "config.json") -> "ModelShape":
        sizes = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
        bad = [k for k in sizes if k in config and (type(config[k]) is not int or config[k] < 1)]
        if bad:
            raise UserError(f"{source}: {', '.join(bad)} must be positive whole numbers")
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
        except (TypeError, ValueError, ZeroDivisionError, AttributeError) as e:
            raise UserError(f"{source}: a size field has an unusable value ({e})") from None

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
        per_layer = sum(i * o for i, o in map(self.projection_dims, PROJECTIONS)) + 2 * self.hidden_size
        head = 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size
        return self.vocab_size * self.hidden_size + self.num_layers * per_layer + self.hidden_size + head

    def fingerprint(self) -> str:
        """Identifies the architecture an adapter fits: equal for a model and its quantized
        conversions, different for any other shape."""
        canonical = json.dumps({k: getattr(self, k) for k in FINGERPRINT_KEYS}, sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def describe(self) -> str:
        quant = f", {self.quant_bits}-bit" if self.quant_bits else ""
        return (f"{self.model_type} {self.num_layers} layers x hidden {self.hidden_size}, "
                f"{self.num_heads}/{self.num_kv_heads} heads, vocab {self.vocab_size}{quant}")


def read_model_config(model_dir: Path) -> dict:
    path = model_dir / "config.json"
    if not path.exists():
        raise UserError(f"{model_dir}: no config.json; give a Hugging Face or MLX model directory")
    config = parse_user_json(read_user_text(path, "model config"), path)
    if not isinstance(config, dict):
        raise UserError(f"{path}: must hold a JSON object (a model's config)")
    return config


def check_llama_family(config: dict, source: str) -> None:
    model_type = config.get("model_type")
    if model_type not in LLAMA_FAMILY:
        raise UserError(f"{source}: model_type is '{model_type}', but mlx_surgical supports Llama-family models "
                        f"({', '.join(LLAMA_FAMILY)}), such as CodeLlama")
    if "rms_norm_eps" not in config:  # mlx-lm's ModelArgs requires it; the sizes are checked by ModelShape
        raise UserError(f"{source}: missing rms_norm_eps (every Llama config.json states it, often 1e-05 or 1e-06); "
                        "copy config.json from the original model")
    # mlx-lm reads these without checking: a wrong type would be a traceback deep inside loading.
    problems = [f"{source}: {key} is {json.dumps(config.get(key))}, not a positive number; copy config.json from "
                "the original model" for key in ("rms_norm_eps", "rope_theta")
                if key in config and not _positive_number(config[key])]
    for key in ("rope_scaling", "rope_parameters"):
        if config.get(key) is not None and not isinstance(config[key], dict):
            problems.append(f"{source}: {key} is {json.dumps(config[key])}, not an object (or null); copy "
                            "config.json from the original model")
    rope_parameters = config.get("rope_parameters")
    theta = rope_parameters.get("rope_theta") if isinstance(rope_parameters, dict) else None
    if theta is not None and not _positive_number(theta):
        problems.append(f"{source}: rope_parameters.rope_theta is {json.dumps(theta)}, not a positive number; copy "
                        "config.json from the original model")
    if problems:
        raise UserError(*problems)


def _positive_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < math.inf


def local_shape(model_dir: Path) -> ModelShape:
    """The shape of a local model directory, after the Llama-family check."""
    config = read_model_config(model_dir)
    check_llama_family(config, str(model_dir / "config.json"))
    return ModelShape.from_config(config, str(model_dir / "config.json"))
