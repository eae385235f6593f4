"""Where LoRA is attached: freeze the base, wrap exactly the target projections in mlx-lm's
LoRA layers, count what trains, and the reverse operations (load an adapter, fuse it).
These act on a model in memory; the adapter on disk is adapter.py's.
"""

from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.tuner.lora import LoRALinear
from mlx_lm.tuner.utils import linear_to_lora_layers, load_adapters

from .adapter import AdapterConfig, adapted_layer_count, lora_parameters
from .config import LoraConfig
from .console import working
from .errors import UserError
from .model import LoadedModel, load_model
from .rundir import ADAPTER_FILE
from .shape import ModelShape


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
    linear_to_lora_layers(model, num_layers, lora_parameters(lora.rank, lora.scale, lora.dropout, lora.target_modules))
    if lora.dropout > 0:
        for _, module in model.named_modules():
            if isinstance(module, LoRALinear):
                module.dropout = HashDropout(lora.dropout)
    return trainable_parameter_count(model)


def trainable_parameter_count(model: nn.Module) -> int:
    return sum(v.size for _, v in tree_flatten(model.trainable_parameters()))


def adapter_weights(model: nn.Module) -> dict[str, mx.array]:
    return dict(tree_flatten(model.trainable_parameters()))


def apply_adapter(model: nn.Module, adapter_dir: str | Path, shape: ModelShape, base_path: str) -> AdapterConfig:
    """Attach LoRA layers and load trained weights, checking the adapter fits this base."""
    config = AdapterConfig.read(adapter_dir)
    config.check_fits(shape, base_path, adapter_dir)
    try:
        load_adapters(model, str(adapter_dir))
    except ValueError as e:  # mlx-lm lists every tensor whose shape does not fit
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise UserError(f"{adapter_dir}: adapter does not fit {base_path} ({shape.describe()}): {first}") from None
    except (RuntimeError, OSError) as e:  # MLX's safetensors reader on a damaged or missing file
        raise UserError(f"{Path(adapter_dir) / ADAPTER_FILE}: cannot be read ({e}); train or export the adapter "
                        "again") from None
    model.eval()
    return config


def load_with_adapter(model_path: str, adapter_dir: Optional[str | Path] = None, progress: bool = False,
                      where: str = "model.path", dtype: Optional[str] = "auto") -> LoadedModel:
    """The base model, with the adapter attached when one is given (base_only below gives the
    base model's outputs from the same weights)."""
    with working(f"loading {model_path}", progress):
        loaded = load_model(model_path, dtype=dtype, where=where)
    if adapter_dir is not None:
        apply_adapter(loaded.model, adapter_dir, loaded.shape, model_path)
    return loaded


def lora_modules(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]


def fuse_lora(model: nn.Module, dequantize: bool = False) -> nn.Module:
    """Merge every LoRA layer into its base projection (W + scale * B^T A^T)."""
    fused = [(name, m.fuse(dequantize=dequantize)) for name, m in lora_modules(model)]
    if fused:
        model.update_modules(tree_unflatten(fused))
    return model


@contextmanager
def base_only(model):
    """Inside this block a model with an adapter attached computes exactly what its base model
    computes: each LoRA update is scaled by 0, so y + 0 = y bit for bit, without a second copy of
    the model in memory."""
    layers = [module for _, module in lora_modules(model)]
    scales = [module.scale for module in layers]
    for module in layers:
        module.scale = 0.0
    try:
        yield
    finally:
        for module, scale in zip(layers, scales):
            module.scale = scale
