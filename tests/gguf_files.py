"""Write a Hugging Face Llama directory (the tiny model) as a llama.cpp model GGUF, in the layout
llama.cpp's convert_hf_to_gguf.py produces: llama.* metadata, a SentencePiece vocabulary, q/k
rows permuted for llama.cpp's rotary embedding, tensors in the requested type (norms in F32).

The tests check what this writes against transformers' own GGUF loader, which was written
independently of ours, before trusting it to test our converter."""

import json
from pathlib import Path

import gguf
import numpy as np
from safetensors.numpy import load_file

from mlx_surgical.convert.gguf import GLOBAL_MODULES, LAYER_MODULES
from mlx_surgical.export.gguf import permute_rows

FILE_TYPES = {"F32": gguf.LlamaFileType.ALL_F32, "F16": gguf.LlamaFileType.MOSTLY_F16,
              "BF16": gguf.LlamaFileType.MOSTLY_BF16, "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
              "Q4_1": gguf.LlamaFileType.MOSTLY_Q4_1, "Q5_0": gguf.LlamaFileType.MOSTLY_Q5_0,
              "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}


def gguf_name(hf_name: str) -> str:
    module = hf_name[:-len(".weight")]
    for gguf_base, hf_module in GLOBAL_MODULES.items():
        if module == hf_module:
            return f"{gguf_base}.weight"
    _, _, layer, rest = module.split(".", 3)
    (gguf_base,) = [g for g, h in LAYER_MODULES.items() if h == rest]
    return f"blk.{layer}.{gguf_base}.weight"


def write_llama_gguf(hf_dir: Path, out: Path, tensor_type: str = "F32", extra_metadata: dict = (),
                     extra_tensors: dict = (), arch: str = "llama") -> Path:
    """extra_metadata: {key: (value, gguf.GGUFValueType)}; extra_tensors: {name: array}."""
    config = json.loads((hf_dir / "config.json").read_text())
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    qtype = gguf.GGMLQuantizationType[tensor_type]
    writer = gguf.GGUFWriter(str(out), arch=arch)
    writer.add_name(hf_dir.name)
    writer.add_file_type(FILE_TYPES[tensor_type])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(config["hidden_size"] // heads)
    writer.add_rope_freq_base(config.get("rope_theta") or config.get("rope_parameters", {}).get("rope_theta", 1e4))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    for key, value in dict(extra_metadata).items():
        writer.add_key_value(key, value[0], value[1])

    vocab = gguf.SentencePieceVocab(hf_dir)
    tokens, scores, types = zip(*vocab.all_tokens())
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(list(tokens))
    writer.add_token_scores(list(scores))
    writer.add_token_types([int(t) for t in types])
    gguf.SpecialVocab(hf_dir, n_vocab=len(tokens)).add_to_gguf(writer)

    for name, value in load_file(str(hf_dir / "model.safetensors")).items():
        if name.endswith("q_proj.weight"):
            value = permute_rows(value, heads)
        elif name.endswith("k_proj.weight"):
            value = permute_rows(value, kv_heads)
        if value.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(gguf_name(name), value.astype(np.float32))
        else:
            data = gguf.quants.quantize(value.astype(np.float32), qtype)
            writer.add_tensor(gguf_name(name), data, raw_shape=data.shape, raw_dtype=qtype)
    for name, value in dict(extra_tensors).items():
        writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out
