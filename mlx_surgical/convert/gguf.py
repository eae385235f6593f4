"""Convert a Llama-architecture GGUF file (what llama.cpp runs and Ollama stores) to an MLX
model directory, in Hugging Face names and row order, like a converted Hugging Face model.

  llama.* metadata           -> config.json (layers, heads, RoPE theta and scaling, norm epsilon,
                                vocabulary, tied output: `hf_config`)
  tokenizer.ggml.* metadata  -> tokenizer files, built by transformers from the GGUF's own
                                vocabulary (SentencePiece `llama` and BPE `gpt2`), with its chat
                                template and special tokens
  blk.N.attn_q.weight ...    -> model.layers.N.self_attn.q_proj.weight ... (`hf_module`), with
                                the rows of q and k put back in Hugging Face order: llama.cpp's
                                converter interleaves each head's two rotary halves.

A Q4_0, Q4_1 or Q8_0 block is 32 weights sharing a float16 scale (and for Q4_1 a minimum): exactly
MLX's affine quantization with group size 32, so those tensors are repacked bit for bit (`repack`)
and lose nothing beyond the file's own quantization. Every other type (F32, F16, BF16, the
K-quants) is dequantized by the gguf package, cast to `dtype` and, with `bits`, quantized by MLX
like a Hugging Face source. The file is read through a memory map, one tensor at a time.
"""

import importlib.util
from collections import Counter
from pathlib import Path
from typing import Optional

import gguf
import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import numpy as np
from gguf.quants import dequantize
from mlx_lm.models import llama
from mlx_lm.utils import save_config, save_model
from transformers import AutoTokenizer

from ..console import working
from ..errors import UserError
from ..export.gguf import GGUF_NAMES
from ..files import sha256_file, staged_directory
from ..provenance import Provenance
from ..rundir import now
from ..shape import PROJECTION_PATHS

ARCHITECTURE = "llama"
# GGUF tensor name (without ".weight") -> Hugging Face module path.
GLOBAL_MODULES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
LAYER_MODULES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                 **{gguf_name: PROJECTION_PATHS[short] for short, gguf_name in GGUF_NAMES.items()}}
NATIVE_GROUP_SIZE = 32
NATIVE_BITS = {"Q4_0": 4, "Q4_1": 4, "Q8_0": 8}  # GGUF types that are MLX affine quantization as they are


def metadata(reader, key: str, default=None):
    field = reader.get_field(key)
    return default if field is None else field.contents()


def hf_module(gguf_name: str) -> Optional[str]:
    """blk.3.attn_q.weight -> model.layers.3.self_attn.q_proj; None for a tensor we do not know."""
    if not gguf_name.endswith(".weight"):
        return None
    base = gguf_name[:-len(".weight")]
    if base in GLOBAL_MODULES:
        return GLOBAL_MODULES[base]
    parts = base.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in LAYER_MODULES:
        return f"model.layers.{parts[1]}.{LAYER_MODULES[parts[2]]}"
    return None


def unpermute_rows(rows: np.ndarray, heads: int) -> np.ndarray:
    """Hugging Face's row order of a q/k projection from llama.cpp's: the inverse of
    export.gguf.permute_rows. Acts on rows only, so it applies to packed quantized weights,
    scales and biases alike."""
    out = rows.shape[0]
    return rows.reshape(heads, out // heads // 2, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def repack(blocks: np.ndarray, type_name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(weight, scales, biases) in MLX's affine layout (group size 32) from a Q4_0, Q4_1 or Q8_0
    tensor's raw blocks (rows x bytes). GGUF's weight = d * q (+ m), with q in [0, 16) minus 8
    for Q4_0, and a signed byte for Q8_0; MLX's weight = scale * q + bias with unsigned q."""
    rows = blocks.shape[0]
    header = {"Q4_0": 2, "Q4_1": 4, "Q8_0": 2}[type_name]
    blocks = blocks.reshape(rows, -1, header + (32 if type_name == "Q8_0" else 16))
    scales = np.ascontiguousarray(blocks[..., :2]).view(np.float16)[..., 0]
    quants = blocks[..., header:]
    if type_name == "Q8_0":
        biases = scales * np.float16(-128)  # a power of two: exact in float16
        packed = (quants.view(np.int8).astype(np.int16) + 128).astype(np.uint8)
    else:
        if type_name == "Q4_1":
            biases = np.ascontiguousarray(blocks[..., 2:4]).view(np.float16)[..., 0]
        else:
            biases = scales * np.float16(-8)
        # A GGUF block keeps weights j and j + 16 in the low and high nibble of byte j; MLX keeps
        # weights 2i and 2i + 1 in the low and high nibble of byte i.
        q = np.concatenate([quants & 0x0F, quants >> 4], axis=-1)
        packed = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    return np.ascontiguousarray(packed.reshape(rows, -1)).view(np.uint32), scales, biases


def hf_config(reader, path: Path, tensor_names: set[str], rows: dict[str, int]) -> dict:
    """config.json from the GGUF's llama.* metadata; a UserError for what mlx-lm's Llama cannot run."""
    architecture = metadata(reader, "general.architecture")
    if metadata(reader, "general.type") == "adapter":
        raise UserError(f"{path}: is a LoRA adapter, not a model; convert the model it applies to")
    if architecture != ARCHITECTURE:
        raise UserError(f"{path}: architecture '{architecture}' is not supported; mlx_surgical converts "
                        "Llama-architecture GGUF models (Llama 2, CodeLlama, Mistral 7B, SmolLM2)")
    arch = lambda key, default=None: metadata(reader, f"{ARCHITECTURE}.{key}", default)
    problems = []
    hidden, heads = arch("embedding_length"), arch("attention.head_count")
    kv_heads = arch("attention.head_count_kv", heads)
    if hidden is None or heads is None or arch("block_count") is None or arch("feed_forward_length") is None:
        raise UserError(f"{path}: lacks llama.embedding_length, attention.head_count, block_count or "
                        "feed_forward_length; not a complete llama.cpp model file")
    if isinstance(kv_heads, list) or isinstance(arch("feed_forward_length"), list):
        problems.append(f"{path}: per-layer head counts or feed-forward sizes are not supported")
    head_dim = arch("attention.key_length", hidden // heads)
    if arch("rope.dimension_count", head_dim) != head_dim:
        problems.append(f"{path}: RoPE on {arch('rope.dimension_count')} of {head_dim} head dimensions "
                        "(partial rotary) is not supported")
    if arch("expert_count", 0):
        problems.append(f"{path}: a mixture-of-experts model ({arch('expert_count')} experts) is not supported")
    if "rope_freqs.weight" in tensor_names:
        problems.append(f"{path}: has per-frequency RoPE factors (rope_freqs, Llama 3.1 style), which are not "
                        "supported; convert the Hugging Face model instead")
    scaling_type = arch("rope.scaling.type", "linear" if arch("rope.scale_linear") else "none")
    factor = arch("rope.scaling.factor", arch("rope.scale_linear"))
    rope_scaling = None
    if scaling_type == "linear" and factor and factor != 1.0:
        rope_scaling = {"type": "linear", "factor": factor}
    elif scaling_type == "yarn":
        rope_scaling = {"rope_type": "yarn", "factor": factor,
                        "original_max_position_embeddings": arch("rope.scaling.original_context_length")}
    elif scaling_type not in ("none", "linear"):
        problems.append(f"{path}: RoPE scaling '{scaling_type}' is not supported (linear and yarn are)")
    if problems:
        raise UserError(*problems)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": arch("feed_forward_length"),
        "num_hidden_layers": arch("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "vocab_size": rows["token_embd.weight"],
        "max_position_embeddings": arch("context_length", 4096),
        # Stored as float32 in the file: 1e-5 reads back as 9.999999747e-06.
        "rms_norm_eps": float(f"{arch('attention.layer_norm_rms_epsilon', 1e-5):.6g}"),
        "rope_theta": float(arch("rope.freq_base", 10000.0)),
        "rope_scaling": rope_scaling,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        # mlx-lm's Llama ties by default: always say which.
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bos_token_id": metadata(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": metadata(reader, "tokenizer.ggml.eos_token_id"),
    }
    return {k: v for k, v in config.items() if v is not None}


def convert_tensors(reader, path: Path, config: dict, bits: Optional[int], group_size: int, dtype: str):
    """Hugging Face-named MLX arrays, {module: {"group_size", "bits"}} for the quantized ones, and
    the names of the tensors repacked as they were."""
    target = getattr(mx, dtype)
    native_scale_dtype = mx.float32 if dtype == "float32" else mx.float16  # float16 scales lose nothing
    q_heads = {"self_attn.q_proj": config["num_attention_heads"], "self_attn.k_proj": config["num_key_value_heads"]}
    weights, quantized, repacked, problems = {}, {}, [], []
    for tensor in reader.tensors:
        module = hf_module(tensor.name)
        type_name = tensor.tensor_type.name
        if module is None:
            problems.append(f"{path}: tensor {tensor.name} has no place in a Llama model; is this a llama.cpp "
                            "model file of another architecture?")
            continue
        heads = next((h for suffix, h in q_heads.items() if module.endswith(suffix)), None)
        data = tensor.data
        if bits is not None and type_name in NATIVE_BITS and data.ndim == 2:
            arrays = repack(np.asarray(data), type_name)
            if heads:
                arrays = tuple(unpermute_rows(a, heads) for a in arrays)
            weights[f"{module}.weight"] = mx.array(arrays[0])
            weights[f"{module}.scales"] = mx.array(arrays[1]).astype(native_scale_dtype)
            weights[f"{module}.biases"] = mx.array(arrays[2]).astype(native_scale_dtype)
            quantized[module] = {"group_size": NATIVE_GROUP_SIZE, "bits": NATIVE_BITS[type_name]}
            repacked.append(tensor.name)
            continue
        try:
            values = dequantize(np.asarray(data), tensor.tensor_type)
        except NotImplementedError:
            problems.append(f"{path}: tensor {tensor.name} is of type {type_name}, which the gguf package cannot "
                            "dequantize; supported: F32, F16, BF16, Q4_0 to Q8_0, the K-quants and IQ types")
            continue
        if heads:
            values = unpermute_rows(values, heads)
        weight = mx.array(values).astype(target)
        if bits is not None and weight.ndim == 2:
            if weight.shape[1] % group_size:
                problems.append(f"--group-size: {group_size} does not divide the {weight.shape[1]} inputs of "
                                f"{tensor.name}; use {NATIVE_GROUP_SIZE} or 64")
                continue
            weight, scales, biases = mx.quantize(weight, group_size=group_size, bits=bits)
            weights[f"{module}.scales"], weights[f"{module}.biases"] = scales, biases
            quantized[module] = {"group_size": group_size, "bits": bits}
        weights[f"{module}.weight"] = weight
        mx.eval(weights)  # one tensor at a time: the memory map is not held for the whole file
    if problems:
        raise UserError(*problems)
    return weights, quantized, repacked


def quantization_config(quantized: dict[str, dict]) -> dict:
    """mlx-lm's form: the most common setting, and each module that differs by its path."""
    counts = Counter((q["group_size"], q["bits"]) for q in quantized.values())
    (group_size, bits), _ = counts.most_common(1)[0]
    return {"group_size": group_size, "bits": bits,
            **{m: q for m, q in sorted(quantized.items()) if (q["group_size"], q["bits"]) != (group_size, bits)}}


def tokenizer_reader_problem(source: str) -> Optional[str]:
    """Why a GGUF's tokenizer cannot be built here: transformers reads it with a module that
    imports PyTorch, which mlx-surgical itself does not need."""
    if importlib.util.find_spec("torch") is None:
        return (f"{source}: converting a GGUF needs PyTorch (transformers' GGUF tokenizer reader imports it); "
                "install it with `pip install -e \".[gguf]\"` in the mlx_surgical checkout")
    return None


def save_tokenizer(path: Path, out: Path, reader) -> None:
    kind = metadata(reader, "tokenizer.ggml.model")
    if kind is None:
        raise UserError(f"{path}: holds no tokenizer (tokenizer.ggml.model); it cannot be converted on its own")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:  # transformers signals an unknown tokenizer kind in several ways
        raise UserError(f"{path}: transformers cannot build a tokenizer from this GGUF's '{kind}' vocabulary "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    tokenizer.save_pretrained(str(out))


def write_model_dir(reader, path: Path, out: Path, config: dict, bits: Optional[int], group_size: int, dtype: str,
                    source: str, origin: Optional[dict]) -> None:
    """Weights, config.json, tokenizer and provenance.json, built beside `out` and renamed into place."""
    weights, quantized, repacked = convert_tensors(reader, path, config, bits, group_size, dtype)
    if quantized:
        config["quantization"] = quantization_config(quantized)
    config["torch_dtype"] = dtype

    model = llama.Model(llama.ModelArgs.from_dict(config))
    if quantized:
        nn.quantize(model, class_predicate=lambda module, _: quantized.get(module, False))
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise UserError(f"{path}: its tensors do not make the Llama model its metadata describes ({e})") from None

    file_type = metadata(reader, "general.file_type")
    quantization = (gguf.LlamaFileType(file_type).name.removeprefix("MOSTLY_")
                    if file_type in set(gguf.LlamaFileType) else None)
    with staged_directory(out) as staging:
        save_model(staging, model)
        save_config(config, staging / "config.json")
        save_tokenizer(path, staging, reader)
        Provenance(
            source=source,
            bits=bits,
            group_size=group_size if bits else None,
            dtype=dtype,
            converted_with=f"mlx-lm {mlx_lm.__version__}",
            created=now(),
            gguf={
                "file": str(path.resolve()),
                "sha256": sha256_file(path),
                "size_bytes": path.stat().st_size,
                "quantization": quantization,
                "tensor_types": dict(Counter(t.tensor_type.name for t in reader.tensors).most_common()),
                "tensors_kept_quantized": len(repacked),
                **(origin or {}),
            },
        ).write(staging)


def convert(path: Path, out: Path, bits: Optional[int], group_size: int, dtype: str, source: str,
            progress: bool = True, origin: Optional[dict] = None) -> Path:
    """Write the MLX model directory `out` from the GGUF file `path`. `source` is what the user
    named (a path or ollama:NAME); `origin` adds facts about where the file came from."""
    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, OSError) as e:
        raise UserError(f"{path}: not a readable GGUF file ({e})") from None
    tensor_names = {t.name for t in reader.tensors}
    if "token_embd.weight" not in tensor_names:
        raise UserError(f"{path}: has no token_embd.weight; not a llama.cpp model file")
    rows = {t.name: int(t.shape[-1]) for t in reader.tensors}  # GGUF lists dimensions innermost first
    config = hf_config(reader, path, tensor_names, rows)
    what = f"{bits}-bit" if bits else dtype
    with working(f"converting {source} to {what} MLX weights in {out}", progress):
        write_model_dir(reader, path, out, config, bits, group_size, dtype, source, origin)
    return out
