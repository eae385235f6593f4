"""One set of weights for both sides of the comparison: the base model with the adapter
attached, and the same model with every LoRA update switched off.

Switching off scales each update by 0, so the base side computes y + 0 = y: the base model's
outputs bit for bit, without a second copy of a 7B model in memory.
"""

from contextlib import contextmanager
from pathlib import Path

from ..model import LoadedModel, load_model
from ..surgery import apply_adapter, lora_modules


def load_adapted(model_path: str, adapter_dir: str | Path, dtype: str = "auto") -> LoadedModel:
    loaded = load_model(model_path, dtype=dtype)
    apply_adapter(loaded.model, adapter_dir, loaded.shape, model_path)
    return loaded


@contextmanager
def base_only(model):
    """Inside this block the model computes exactly what its base model computes."""
    layers = [module for _, module in lora_modules(model)]
    scales = [module.scale for module in layers]
    for module in layers:
        module.scale = 0.0
    try:
        yield
    finally:
        for module, scale in zip(layers, scales):
            module.scale = scale
