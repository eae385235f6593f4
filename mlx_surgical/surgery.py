"""Where LoRA is attached: freeze the base, wrap exactly the target projections in mlx-lm's
LoRA layers, count what trains, and the reverse operations (load an adapter, fuse it).

The adapter is stored in mlx-lm's own format (adapters.safetensors + adapter_config.json),
so `mlx_lm.generate --adapter-path` loads a run directory as it is. The config also carries
`lora_alpha` and the base model's fingerprint, which mlx-lm ignores and our exporters,
Ollama and the registry use.
"""

import json
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.tuner.lora import LoRALinear
from mlx_lm.tuner.utils import linear_to_lora_layers

from .config import PROJECTION_PATHS, LoraConfig
from .errors import UserError
from .model import ModelShape

ADAPTER_FILE = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def adapted_layer_count(lora: LoraConfig, num_layers: int) -> int:
    return num_layers if lora.layers == "all" else min(int(lora.layers), num_layers)


def lora_parameters(lora: LoraConfig) -> dict:
    """The `lora_parameters` block of mlx-lm's adapter config; mlx-lm scales by `scale` alone."""
    return {
        "rank": lora.rank,
        "scale": lora.scale,
        "dropout": lora.dropout,
        "keys": [PROJECTION_PATHS[t] for t in lora.target_modules],
    }


def adapter_config(lora: LoraConfig, shape: ModelShape, base_model: str, prompt: Optional[dict] = None,
                   resolved_path: Optional[str] = None) -> dict:
    """mlx-lm's adapter_config.json, plus the fields other consumers need (alpha for Ollama
    and PEFT, the base model's fingerprint, and the prompt format to generate with)."""
    return {
        "fine_tune_type": "lora",
        "num_layers": adapted_layer_count(lora, shape.num_layers),
        "lora_parameters": lora_parameters(lora),
        # mlx-lm reads only the fields above; Ollama and PEFT think in alpha, not scale.
        "lora_alpha": lora.alpha,
        "target_modules": list(lora.target_modules),
        "base_model": {"path": base_model, "resolved_path": resolved_path or base_model,
                       "fingerprint": shape.fingerprint(), "shape": shape.describe(),
                       "num_layers": shape.num_layers, "config": asdict(shape)},
        "prompt": prompt or {"format": "auto", "system_prompt": None},
    }


class HashDropout(nn.Module):
    """Dropout whose mask comes from hashing each element's index with one random draw.

    Same distribution and scaling as nn.Dropout, but MLX's per-element threefry costs ~6 ns an
    element on the CPU backend (4% of a training step on q/k/v); a multiply-xorshift hash is a
    few integer operations that mx.compile fuses. The draw comes from MLX's random state, so
    seeding and exact resume work as before."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p
        self._threshold = min(int(round(p * 2 ** 32)), 2 ** 32 - 1)

    def __call__(self, x: mx.array) -> mx.array:
        if not self.training or self.p == 0:
            return x
        key = mx.random.randint(0, 2 ** 31 - 1, (), dtype=mx.int32).astype(mx.uint32)
        h = mx.arange(x.size, dtype=mx.uint32).reshape(x.shape) * 0x9E3779B1 + key
        # murmur3's finaliser: every input bit flips about half of the output bits.
        h = (h ^ (h >> 16)) * 0x85EBCA6B
        h = (h ^ (h >> 13)) * 0xC2B2AE35
        h = h ^ (h >> 16)
        return mx.where(h >= self._threshold, x * (1.0 / (1.0 - self.p)), 0.0).astype(x.dtype)


def attach_lora(model: nn.Module, lora: LoraConfig, seed: int) -> int:
    """Freeze the base and wrap the target projections; returns the trainable parameter count."""
    model.freeze()
    mx.random.seed(seed)
    num_layers = adapted_layer_count(lora, len(model.layers))
    linear_to_lora_layers(model, num_layers, lora_parameters(lora))
    if lora.dropout > 0:
        for _, module in model.named_modules():
            if isinstance(module, LoRALinear):
                module.dropout = HashDropout(lora.dropout)
    return trainable_parameter_count(model)


def trainable_parameter_count(model: nn.Module) -> int:
    return sum(v.size for _, v in tree_flatten(model.trainable_parameters()))


def adapter_weights(model: nn.Module) -> dict[str, mx.array]:
    return dict(tree_flatten(model.trainable_parameters()))


def read_adapter_config(adapter_dir: str | Path) -> dict:
    path = Path(adapter_dir) / ADAPTER_CONFIG
    if not path.exists():
        raise UserError(f"{adapter_dir}: no {ADAPTER_CONFIG}; give a run directory or an mlx export")
    return json.loads(path.read_text())


def check_adapter_fits(adapter_dir: str | Path, shape: ModelShape, base_path: str) -> dict:
    """Refuse, naming both models, to apply an adapter trained on a different base."""
    config = read_adapter_config(adapter_dir)
    recorded = config.get("base_model", {})
    if recorded.get("fingerprint") and recorded["fingerprint"] != shape.fingerprint():
        raise UserError(f"{adapter_dir}: this adapter was trained on {recorded.get('path')} "
                        f"({recorded.get('shape')}), not on {base_path} ({shape.describe()}); "
                        "use the base model it was trained on")
    if config.get("num_layers", 0) > shape.num_layers:
        raise UserError(f"{adapter_dir}: the adapter covers {config['num_layers']} layers but {base_path} "
                        f"has {shape.num_layers}; use the base model it was trained on")
    return config


def apply_adapter(model: nn.Module, adapter_dir: str | Path, shape: ModelShape, base_path: str) -> dict:
    """Attach LoRA layers and load trained weights, checking the adapter fits this base."""
    from mlx_lm.tuner.utils import load_adapters

    config = check_adapter_fits(adapter_dir, shape, base_path)
    try:
        load_adapters(model, str(adapter_dir))
    except ValueError as e:  # mlx-lm lists every tensor whose shape does not fit
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise UserError(f"{adapter_dir}: adapter does not fit {base_path} ({shape.describe()}): {first}") from None
    model.eval()
    return config


def lora_modules(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]


def fuse_lora(model: nn.Module, dequantize: bool = False) -> nn.Module:
    """Merge every LoRA layer into its base projection (W + scale * B^T A^T)."""
    fused = [(name, m.fuse(dequantize=dequantize)) for name, m in lora_modules(model)]
    if fused:
        model.update_modules(tree_unflatten(fused))
    return model
