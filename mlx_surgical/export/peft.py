"""Hugging Face PEFT format: adapter_model.safetensors + adapter_config.json, loadable with
`PeftModel.from_pretrained` and `AutoPeftModelForCausalLM.from_pretrained` (transformers, vLLM,
TGI): the config names the Hugging Face base, not an MLX conversion of it.

PEFT keeps lora_A as (r, in) and lora_B as (out, r) and scales by lora_alpha / r, so the
mlx-lm pair (A: in x r, B: r x out, scale) maps by transposing both and alpha = scale x r.
"""

import json
from pathlib import Path
from typing import Optional

from safetensors.numpy import save_file

from ..adapter import Adapter
from ..files import staged_directory
from ..provenance import is_hub_snapshot, read_provenance

# mlx-lm module path inside a decoder layer -> PEFT tensor name, per LoRA half.
PEFT_NAME = "base_model.model.model.layers.{layer}.{module}.lora_{half}.weight"


def peft_tensors(adapter: Adapter) -> dict:
    tensors = {}
    for p in adapter.pairs:
        tensors[PEFT_NAME.format(layer=p.layer, module=p.module, half="A")] = p.a.T.copy()
        tensors[PEFT_NAME.format(layer=p.layer, module=p.module, half="B")] = p.b.T.copy()
    return tensors


def hugging_face_base(adapter: Adapter) -> tuple[str, Optional[str]]:
    """(name or path, revision) of the base for transformers. An MLX conversion is not loadable
    there, so a converted base is named by the Hugging Face model it was converted from
    (provenance.json); any other base by the path it was trained from."""
    base = adapter.config.base
    if base:
        provenance = read_provenance(Path(base.resolved_path))
        if provenance.hugging_face_model:
            hub = provenance.hugging_face_model == provenance.source
            return provenance.hugging_face_model, provenance.revision if hub else None
        if is_hub_snapshot(Path(base.resolved_path)):  # trained straight from a repo id
            return base.path, Path(base.resolved_path).name
    return adapter.config.local_base_model, None


def peft_config(adapter: Adapter) -> dict:
    num_layers = adapter.config.base.num_layers if adapter.config.base else None
    base, revision = hugging_face_base(adapter)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": adapter.config.rank,
        "lora_alpha": adapter.config.alpha,
        "lora_dropout": adapter.config.dropout,
        "target_modules": adapter.projections,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "revision": revision,
    }
    if num_layers is None or adapter.layers != list(range(num_layers)):
        config["layers_to_transform"] = adapter.layers
        config["layers_pattern"] = "layers"
    return config


def write(adapter: Adapter, out: Path) -> Path:
    with staged_directory(out) as staging:
        save_file(peft_tensors(adapter), str(staging / "adapter_model.safetensors"), metadata={"format": "pt"})
        (staging / "adapter_config.json").write_text(json.dumps(peft_config(adapter), indent=2) + "\n")
    return out
