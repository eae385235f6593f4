"""llama.cpp / Ollama LoRA adapter in GGUF, written with the `gguf` package.

What llama.cpp expects (the layout its own convert_lora_to_gguf.py produces):
  general.architecture = llama, general.type = adapter, adapter.type = lora,
  adapter.lora.alpha = alpha (llama.cpp scales by alpha / rank);
  tensors blk.{i}.attn_q.weight.lora_a (PEFT's A: r x in) and .lora_b (PEFT's B: out x r).
llama.cpp stores q and k with the rows of each head interleaved differently from Hugging
Face (its conversion permutes them for its rotary embedding), so lora_b of q_proj and
k_proj gets the same row permutation; lora_a is untouched, as the permutation acts on the
output side only.
"""

from pathlib import Path

import gguf
import numpy as np

from ..adapter import Adapter
from ..files import staged_file
from ..shape import ModelShape

GGUF_NAMES = {
    "q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
    "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down",
}


def permute_rows(rows: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's reordering of a q/k projection's output rows: within each head, the two
    rotary halves are interleaved."""
    out = rows.shape[0]
    return rows.reshape(heads, 2, out // heads // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def gguf_tensors(adapter: Adapter, shape: ModelShape) -> dict[str, np.ndarray]:
    tensors = {}
    for p in adapter.pairs:
        a, b = p.a.T, p.b.T  # PEFT orientation: A (r, in), B (out, r)
        if p.projection == "q_proj":
            b = permute_rows(b, shape.num_heads)
        elif p.projection == "k_proj":
            b = permute_rows(b, shape.num_kv_heads)
        name = f"blk.{p.layer}.{GGUF_NAMES[p.projection]}.weight"
        tensors[f"{name}.lora_a"] = np.ascontiguousarray(a, dtype=np.float32)
        tensors[f"{name}.lora_b"] = np.ascontiguousarray(b, dtype=np.float32)
    return tensors


def write(adapter: Adapter, out: Path) -> Path:
    with staged_file(out) as path:
        writer = gguf.GGUFWriter(str(path), arch="llama")
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, adapter.config.alpha)
        writer.add_name(adapter.directory.name)
        for name, tensor in gguf_tensors(adapter, adapter.config.base_shape()).items():
            writer.add_tensor(name, tensor)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return out
