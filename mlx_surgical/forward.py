"""The training forward pass of a Llama-family model, up to the final norm.

On MLX's CPU backend matrix products run at BLAS speed but transcendental functions do not:
`mx.exp` costs about 14 ns per element (scalar, one thread), so the softmaxes and SiLUs of a
training step took longer than all its matmuls. On the CPU this module computes the same Llama
block with an exp built from multiply-adds and a bit shift, which `mx.compile` turns into a few
fused loops (2-4x faster, relative error below 1e-5). Attention and the SwiGLU are custom
functions with hand-written VJPs that keep only what the backward pass needs (the attention
probabilities, the gate's sigmoid), as a fused kernel would, and RoPE is one fused pass each way. On Metal and CUDA the model's own
forward, with MLX's fused attention, is used.

The parameters are the model's own modules, called in mlx-lm's order, so LoRA layers, RoPE
variants and grouped-query attention behave exactly as in `model(inputs)`.

Frozen quantized layers have a CPU path too: MLX's CPU `quantized_matmul` runs at about
1.5 GFLOP/s, while dequantizing the weight to float32 inside the compiled step and using the
BLAS matmul runs 20-100x faster, and keeps the weights stored at their 4 or 8 bits.

Whether each path pays depends on the CPU (and, for the quantized layers, the model): `tuning.py`
measures and chooses.
"""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.rope_utils import Llama3RoPE

_LOG2E = 1.4426950408889634
# ln 2 split in two (Cody-Waite), so x - n ln2 stays exact for the polynomial below.
_LN2_HI, _LN2_LO = 0.693359375, -2.12194440e-4
# Minimax polynomial for e^r on [-ln2/2, ln2/2] (Cephes expf).
_EXP_POLY = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1,
             5.0000001201e-1)
MASKED_SCORE = -1e9  # additive causal mask; fast_exp maps it to exactly 0


def fast_exp(x: mx.array) -> mx.array:
    """exp(x) for float32 x, as e^r * 2^n with n = round(x / ln 2); inputs above the float32
    range are clamped, NaN stays NaN. Used inside functions with their own VJP only.

    Below -88 the result is exactly 0 (the exponent field is floored at 0), not a subnormal: on
    Intel CPUs an operation that meets a subnormal takes a microcode assist, and the masked half
    of the attention probabilities, with all the backward pass forms from them, made the
    attention 13x slower on a Sapphire Rapids. Subnormal results remain only for x in
    (-88, -87.3), which real scores hardly ever hit."""
    x = mx.clip(x, -88.0, 88.0)
    n = mx.floor(x * _LOG2E + 0.5)
    r = x - n * _LN2_HI - n * _LN2_LO
    p = _EXP_POLY[0]
    for c in _EXP_POLY[1:]:
        p = p * r + c
    mantissa = p * r * r + r + 1.0
    two_to_n = mx.view(mx.maximum(n.astype(mx.int32) + 127, 0) << 23, mx.float32)
    return mantissa * two_to_n


def _grouped(q: mx.array, kv_heads: int) -> mx.array:
    """(batch, heads, length, dim) as (batch, kv_heads, heads_per_kv * length, dim): the query
    heads that share a key/value head side by side, so one matmul serves the group and grouped-
    query attention needs no repeated copies of k and v."""
    B, H, L, D = q.shape
    return q.reshape(B, kv_heads, (H // kv_heads) * L, D)


@mx.custom_function
def causal_attention(q: mx.array, k: mx.array, v: mx.array, mask: mx.array):
    """softmax(q k^T + mask) v for float32 inputs, q (batch, heads, length, head_dim) already
    scaled, k and v (batch, kv_heads, length, head_dim) with kv_heads dividing heads; also
    returns the probabilities (grouped as _grouped lays them out), which the VJP needs."""
    B, H, L, D = q.shape
    G = k.shape[1]
    scores = (_grouped(q, G) @ k.swapaxes(-1, -2)).reshape(B, G, H // G, L, L) + mask
    e = fast_exp(scores - scores.max(axis=-1, keepdims=True))
    probs = (e / e.sum(axis=-1, keepdims=True)).reshape(B, G, (H // G) * L, L)
    return (probs @ v).reshape(B, H, L, D), probs


@causal_attention.vjp
def _causal_attention_vjp(primals, cotangents, outputs):
    q, k, v, mask = primals
    G = k.shape[1]
    grad_out, probs = _grouped(cotangents[0], G), outputs[1]
    grad_probs = grad_out @ v.swapaxes(-1, -2)
    grad_scores = probs * (grad_probs - (grad_probs * probs).sum(axis=-1, keepdims=True))
    return ((grad_scores @ k).reshape(q.shape), grad_scores.swapaxes(-1, -2) @ _grouped(q, G),
            probs.swapaxes(-1, -2) @ grad_out, mx.zeros_like(mask))


@mx.custom_function
def swiglu(gate: mx.array, up: mx.array):
    """silu(gate) * up for float32 inputs; also returns sigmoid(gate) for the VJP."""
    sigmoid = 1.0 / (1.0 + fast_exp(-gate))
    return gate * sigmoid * up, sigmoid


@swiglu.vjp
def _swiglu_vjp(primals, cotangents, outputs):
    gate, up = primals
    grad_out, sigmoid = cotangents[0], outputs[1]
    silu = gate * sigmoid
    return grad_out * up * (sigmoid + silu * (1.0 - sigmoid)), grad_out * silu


def rope_tables(rope, length: int, head_dim: int):
    """(cos, signed sin) of RoPE's angles at positions 0..length-1, shaped (length, 2, dims/2)
    to broadcast over (batch, heads, length, 2, dims/2), computed as MLX's CPU RoPE computes
    them. None for the kinds rotate_halves does not cover (only part of the head rotated,
    interleaved pairs, scaled variants other than Llama 3's): the model's own module runs then."""
    if rope.dims != head_dim or rope.traditional:
        return None
    half = head_dim // 2
    if type(rope) is nn.RoPE:
        exponent = float(np.log(np.float32(rope.base)) / np.float32(half))
        inverse_freqs, scale = mx.exp(mx.arange(0, -half, -1, dtype=mx.float32) * exponent), rope.scale
    elif type(rope) is Llama3RoPE:
        inverse_freqs, scale = mx.reciprocal(rope._freqs.astype(mx.float32)), 1.0
    else:
        return None
    theta = (mx.arange(length, dtype=mx.float32) * scale)[:, None] * inverse_freqs
    cos, sin = mx.cos(theta), mx.sin(theta)
    return mx.stack([cos, cos], axis=1), mx.stack([-sin, sin], axis=1)


@mx.custom_function
def rotate_halves(x: mx.array, cos: mx.array, signed_sin: mx.array):
    """RoPE on x (batch, heads, length, 2, dims/2): each half's partner is the other half, read
    through a reversed view, so forward and backward are one fused pass each. MLX's CPU RoPE
    slices, concatenates and, in the backward pass, scatters the halves into zeros."""
    return x * cos + x[..., ::-1, :] * signed_sin


@rotate_halves.vjp
def _rotate_halves_vjp(primals, cotangent, output):
    _, cos, signed_sin = primals
    return cotangent * cos - cotangent[..., ::-1, :] * signed_sin, mx.zeros_like(cos), mx.zeros_like(signed_sin)


def apply_rope(rope, *heads: mx.array) -> list[mx.array]:
    """The model's RoPE on each of heads (batch, heads, length, head_dim), as rotate_halves where
    it covers the kind: the whole micro-step 2-8% faster on an AMD Zen 5 (SmolLM2's and "small"'s shapes)."""
    length, head_dim = heads[0].shape[-2:]
    tables = rope_tables(rope, length, head_dim)
    if tables is None:
        return [rope(x) for x in heads]
    return [rotate_halves(x.reshape(*x.shape[:-1], 2, -1), *tables).reshape(x.shape) for x in heads]


def _float_weight(layer, dtype) -> mx.array:
    weight = mx.dequantize(layer["weight"], layer["scales"], layer.get("biases"), layer.group_size, layer.bits,
                           mode=layer.mode)
    return weight.astype(dtype)


class DequantizingLinear(nn.QuantizedLinear):
    """A frozen QuantizedLinear that, when `dequantize` is set, multiplies by its weight
    dequantized to the input's dtype (BLAS speed on the CPU) instead of quantized_matmul. The
    parameters are the QuantizedLinear's own, so checkpoints, adapters and fusing see no change."""

    dequantize = False

    def __call__(self, x: mx.array) -> mx.array:
        if not self.dequantize:
            return super().__call__(x)
        y = x @ _float_weight(self, x.dtype).T
        return y + self["bias"] if "bias" in self else y


class DequantizingEmbedding(nn.QuantizedEmbedding):
    """The same for a quantized embedding used as the tied output head (`as_linear`)."""

    dequantize = False

    def as_linear(self, x: mx.array) -> mx.array:
        if not self.dequantize:
            return super().as_linear(x)
        return x @ _float_weight(self, x.dtype).T


def quantized_layers(model) -> list:
    return [m for _, m in model.named_modules() if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))]


def set_dequantized_matmuls(model, on: bool) -> None:
    """Route the frozen quantized layers' matmuls through dequantize + float matmul (on) or
    MLX's quantized_matmul (off). The layers keep their class's parameters; only the class
    changes, to the subclass above, so every isinstance check in mlx-lm still holds."""
    for module in quantized_layers(model):
        if type(module) is nn.QuantizedLinear:
            module.__class__ = DequantizingLinear
        elif type(module) is nn.QuantizedEmbedding:
            module.__class__ = DequantizingEmbedding
        module.dequantize = on


def supports_block_forward(model) -> bool:
    """Layers with sliding-window attention (some Mistral configs) keep the model's own path."""
    inner = getattr(model, "model", None)
    return inner is not None and getattr(inner, "swa_idx", None) is None and hasattr(inner, "layers")


def _attention(attn, x: mx.array, mask: mx.array) -> mx.array:
    B, L, _ = x.shape
    q = attn.q_proj(x).reshape(B, L, attn.n_heads, -1).transpose(0, 2, 1, 3)
    k = attn.k_proj(x).reshape(B, L, attn.n_kv_heads, -1).transpose(0, 2, 1, 3)
    v = attn.v_proj(x).reshape(B, L, attn.n_kv_heads, -1).transpose(0, 2, 1, 3)
    q, k = apply_rope(attn.rope, q, k)
    f32 = lambda a: a.astype(mx.float32)  # noqa: E731
    out = causal_attention(f32(q * attn.scale), f32(k), f32(v), mask)[0].astype(x.dtype)
    return attn.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


def _mlp(mlp, x: mx.array) -> mx.array:
    hidden = swiglu(mlp.gate_proj(x).astype(mx.float32), mlp.up_proj(x).astype(mx.float32))[0]
    return mlp.down_proj(hidden.astype(x.dtype))


def _fast_block(layer, h: mx.array, mask: mx.array) -> mx.array:
    h = h + _attention(layer.self_attn, layer.input_layernorm(h), mask)
    return h + _mlp(layer.mlp, layer.post_attention_layernorm(h))


def _checkpointed_block(block, layer, h: mx.array, mask) -> mx.array:
    """The block with its activations recomputed in the backward pass. The layer's trainable
    parameters are passed in explicitly, as mx.checkpoint differentiates only its inputs."""
    def run(params, h):
        layer.update(params)
        return block(layer, h, mask)
    return mx.checkpoint(run)(layer.trainable_parameters(), h)


def hidden_states(model, inputs: mx.array, fast_math: bool, grad_checkpoint: bool = False) -> mx.array:
    """Final-norm hidden states (batch, length, hidden) of a causal forward pass without cache.
    With grad_checkpoint only each layer's input is kept for the backward pass."""
    if not (supports_block_forward(model) and (fast_math or grad_checkpoint)):
        return model.model(inputs)
    inner = model.model
    h = inner.embed_tokens(inputs)
    length = inputs.shape[1]
    if fast_math:
        block, mask = _fast_block, mx.triu(mx.full((length, length), MASKED_SCORE, mx.float32), k=1)
    else:
        block, mask = (lambda layer, h, mask: layer(h, mask)), "causal"
    for layer in inner.layers:
        h = _checkpointed_block(block, layer, h, mask) if grad_checkpoint else block(layer, h, mask)
    return inner.norm(h)


def output_head(model):
    """The function from hidden states to logits: lm_head, or the tied embedding."""
    if model.args.tie_word_embeddings:
        return model.model.embed_tokens.as_linear
    return model.lm_head
