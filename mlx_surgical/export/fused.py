"""Base + adapter merged into one standalone MLX model directory (mlx-lm layout), for tools
that take no adapters. Quantized bases stay quantized unless `dequantize` is set; the
merge itself is mlx-lm's LoRALinear.fuse."""

import json
import shutil
from pathlib import Path
from typing import Optional

from mlx_lm.utils import dequantize_model, save_config, save_model

from ..adapter import Adapter
from ..errors import UserError
from ..files import staged_directory
from ..model import with_mlx_lm_rope
from ..shape import read_model_config
from ..surgery import fuse_lora, load_with_adapter


def write(adapter: Adapter, out: Path, base_model: Optional[str] = None, dequantize: bool = False) -> Path:
    base = base_model or adapter.config.local_base_model
    if not base:
        raise UserError(f"{adapter.directory}: the adapter does not name its base model; pass --base-model")
    loaded = load_with_adapter(base, adapter.directory, where="--base-model" if base_model else "the base model",
                               dtype=None)  # the base's own dtype, not the one computing is fastest in
    model = fuse_lora(loaded.model, dequantize=dequantize)
    config = with_mlx_lm_rope(read_model_config(loaded.path), str(loaded.path))
    if dequantize:
        model = dequantize_model(model)
        config.pop("quantization", None)
        config.pop("quantization_config", None)
    with staged_directory(out) as staging:
        save_model(staging, model)
        save_config(config, staging / "config.json")
        loaded.tokenizer.save_pretrained(str(staging))
        for extra in ("tokenizer.model", "generation_config.json"):
            if (loaded.path / extra).exists():
                shutil.copy2(loaded.path / extra, staging / extra)
        (staging / "fused_from.json").write_text(json.dumps(
            {"base_model": base, "adapter": str(adapter.directory), "dequantized": dequantize}, indent=2) + "\n")
    return out
