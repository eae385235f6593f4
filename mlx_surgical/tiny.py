"""Build a tiny, randomly initialised Llama model directory in Hugging Face layout.

Tests, the quickstart and the benchmarks use it instead of a downloaded model. The
tokenizer is a real SentencePiece model trained on the spot from the bundled sample
data, so the whole pipeline (chat formatting, tokenisation, generation, exports for
llama.cpp and PEFT) runs exactly as it would on CodeLlama. Same arguments, same bytes.
"""

import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import sentencepiece as spm
from safetensors.numpy import save_file
from transformers import AutoTokenizer

from .data import bundled_texts
from .errors import UserError
from .files import staged_directory

# Llama-2 / CodeLlama special token ids: <unk>=0, <s>=1, </s>=2.
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
# The bundled text supports about 2,400 SentencePiece pieces. A larger vocab_size (CodeLlama's
# 32016, for benchmarks) keeps embedding rows the tokenizer never produces, as CodeLlama does.
MAX_TOKENIZER_PIECES = 2048


@dataclass(frozen=True)
class TinyShape:
    """The shape of a tiny Llama model; the defaults keep every dimension a multiple of 64 so
    4-bit quantization with group size 64 touches every projection."""

    layers: int = 2
    hidden_size: int = 64
    intermediate_size: int = 192
    heads: int = 4
    kv_heads: int = 2
    vocab_size: int = 512
    max_position_embeddings: int = 2048
    tie_embeddings: bool = False

    def hf_config(self) -> dict:
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "hidden_act": "silu",
            "tie_word_embeddings": self.tie_embeddings,
            "attention_bias": False,
            "mlp_bias": False,
            "bos_token_id": BOS_ID,
            "eos_token_id": EOS_ID,
            "torch_dtype": "float32",
        }


def _check(shape: TinyShape) -> None:
    problems = []
    if shape.hidden_size % shape.heads:
        problems.append(f"hidden size {shape.hidden_size} is not divisible by {shape.heads} heads")
    if shape.heads % shape.kv_heads:
        problems.append(f"{shape.heads} heads are not divisible by {shape.kv_heads} key/value heads")
    if (shape.hidden_size // shape.heads) % 2:
        problems.append("the head dimension must be even for rotary embeddings")
    if shape.vocab_size < 300:
        problems.append(f"vocab size {shape.vocab_size} is too small: 256 byte pieces + specials need 300 or more")
    if problems:
        raise UserError("tiny model: " + "; ".join(problems))


def random_weights(shape: TinyShape, seed: int) -> dict[str, np.ndarray]:
    """Hugging Face Llama tensor names; projections drawn from N(0, 1/fan_in) (the scale of
    PyTorch's default Linear init), embeddings from N(0, 1), norms at one. Unlike the
    N(0, 0.02) of large-model recipes, this keeps a signal's size through a 64-wide random
    network, so what LoRA changes reaches the output."""
    rng = np.random.default_rng(seed)
    head_dim = shape.hidden_size // shape.heads
    kv_dim = shape.kv_heads * head_dim

    def normal(rows, fan_in, std=None):
        std = 1 / np.sqrt(fan_in) if std is None else std
        return (rng.standard_normal((rows, fan_in)) * std).astype(np.float32)

    h, i = shape.hidden_size, shape.intermediate_size
    weights = {"model.embed_tokens.weight": normal(shape.vocab_size, h, std=1.0)}
    for layer in range(shape.layers):
        prefix = f"model.layers.{layer}"
        weights |= {
            f"{prefix}.self_attn.q_proj.weight": normal(h, h),
            f"{prefix}.self_attn.k_proj.weight": normal(kv_dim, h),
            f"{prefix}.self_attn.v_proj.weight": normal(kv_dim, h),
            f"{prefix}.self_attn.o_proj.weight": normal(h, h),
            f"{prefix}.mlp.gate_proj.weight": normal(i, h),
            f"{prefix}.mlp.up_proj.weight": normal(i, h),
            f"{prefix}.mlp.down_proj.weight": normal(h, i),
            f"{prefix}.input_layernorm.weight": np.ones(h, np.float32),
            f"{prefix}.post_attention_layernorm.weight": np.ones(h, np.float32),
        }
    weights["model.norm.weight"] = np.ones(h, np.float32)
    if not shape.tie_embeddings:
        weights["lm_head.weight"] = normal(shape.vocab_size, h)
    return weights


def train_sentencepiece(vocab_size: int) -> bytes:
    """A byte-fallback BPE SentencePiece model with Llama's special ids, trained single-threaded
    so the same text always yields the same bytes."""
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(bundled_texts()),
        model_writer=buffer,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        split_digits=True,
        # Code needs its indentation and newlines kept as they are.
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        pad_id=-1,
        num_threads=1,
        max_sentence_length=100_000,
        minloglevel=2,
    )
    return buffer.getvalue()


TOKENIZER_CONFIG = {
    # CodeLlama-Instruct ships no chat template either, so the tiny model exercises the
    # [INST] fallback in prompt.py exactly as the real model does.
    "tokenizer_class": "LlamaTokenizer",
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "add_bos_token": True,
    "add_eos_token": False,
    "legacy": False,
    "model_max_length": 2048,
    "clean_up_tokenization_spaces": False,
}


# The quickstart's model: big enough that rank-8 LoRA on q/k/v alone visibly learns the bundled
# pairs (10 epochs take the training loss from 6.7 to about 40%), small enough to train in about
# a minute on two CPU cores. Narrower models, or grouped-query attention (smaller k/v LoRA),
# plateau above half the initial loss.
QUICKSTART_SHAPE = TinyShape(layers=6, hidden_size=256, intermediate_size=768, heads=8, kv_heads=8)
# The shapes the speed scripts measure: "small" (41.7M parameters, CodeLlama's vocabulary), the
# real shape of SmolLM2-135M-Instruct, and "tiny", where per-step overhead dominates.
BENCHMARK_SHAPES = {
    "small": TinyShape(layers=8, hidden_size=512, intermediate_size=1376, heads=8, kv_heads=8, vocab_size=32016,
                       tie_embeddings=True),
    "smollm2": TinyShape(layers=30, hidden_size=576, intermediate_size=1536, heads=9, kv_heads=3, vocab_size=49152,
                         tie_embeddings=True),
    "tiny": TinyShape(),
}


def build_tiny_model(out_dir: str | Path, shape: TinyShape = TinyShape(), seed: int = 0) -> Path:
    """Write config.json, model.safetensors, tokenizer.model, tokenizer.json and the tokenizer
    configs into out_dir, loadable by mlx_lm.load and by transformers."""
    _check(shape)
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out}: {'directory is not empty' if out.is_dir() else 'is a file'}; choose a new "
                        "directory for the tiny model")
    if seed < 0:
        raise UserError(f"seed: {seed} is negative; give a seed of 0 or more")
    with staged_directory(out) as staging:  # a failure leaves no half-written model behind
        (staging / "config.json").write_text(json.dumps(shape.hf_config(), indent=2) + "\n")
        save_file(random_weights(shape, seed), str(staging / "model.safetensors"), metadata={"format": "pt"})
        (staging / "tokenizer.model").write_bytes(train_sentencepiece(min(shape.vocab_size, MAX_TOKENIZER_PIECES)))
        (staging / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2) + "\n")
        special = {k: TOKENIZER_CONFIG[k] for k in ("bos_token", "eos_token", "unk_token")}
        (staging / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
        # A tokenizer.json converted by transformers itself lets both loaders skip the slow
        # SentencePiece conversion; tokenizer.model stays for llama.cpp's converter.
        AutoTokenizer.from_pretrained(str(staging)).backend_tokenizer.save(str(staging / "tokenizer.json"))
        (staging / "tiny_model.json").write_text(json.dumps({"seed": seed, **asdict(shape)}, indent=2) + "\n")
    return out
