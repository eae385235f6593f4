"""The optimised training loss (response positions only, chunked logits, CPU-fast math,
dequantized matmuls) must give the same loss and gradients as the plain path: mlx-lm's
forward, full logits, MLX's cross-entropy, quantized_matmul. Every compute path that
tuning.choose_path can pick is covered."""

from functools import partial

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models.rope_utils import initialize_rope

from mlx_surgical import forward
from mlx_surgical import loss as loss_module
from mlx_surgical.batches import collate
from mlx_surgical.config import LoraConfig
from mlx_surgical.forward import (MASKED_SCORE, apply_rope, causal_attention, fast_exp, quantized_layers, rope_tables,
                                  set_dequantized_matmuls)
from mlx_surgical.loss import CHUNK_ROW_MULTIPLE, loss_chunk_rows, loss_chunks, response_cross_entropy
from mlx_surgical.model import load_model
from mlx_surgical.prompt import Sample
from mlx_surgical.surgery import attach_lora
from mlx_surgical.tiny import TinyShape, build_tiny_model


def full_logits_cross_entropy(model, inputs, targets, loss_index, loss_weight):
    """The plain reference: mlx-lm's forward, logits at every position, MLX's cross-entropy."""
    logits = model(inputs).astype(mx.float32)
    losses = nn.losses.cross_entropy(logits, targets).reshape(-1)[loss_index]
    return (losses * loss_weight).sum(), loss_weight.sum()


def lora_model(model_dir):
    loaded = load_model(str(model_dir), dtype="float32")
    attach_lora(loaded.model, LoraConfig(dropout=0.0), seed=0)
    # Non-zero B matrices, so the LoRA path changes the forward pass and gets real gradients.
    rng = np.random.default_rng(1)
    loaded.model.update(tree_unflatten([
        (name, mx.array(rng.normal(0, 0.05, p.shape).astype(np.float32)))
        for name, p in tree_flatten(loaded.model.trainable_parameters()) if name.endswith("lora_b")]))
    return loaded.model


def ragged_batch(vocab_size):
    """Three examples of different lengths and prompt lengths: padding in width and in loss slots."""
    rng = np.random.default_rng(0)
    samples = [Sample(rng.integers(3, vocab_size, n).astype(np.int32), start, f"s{n}")
               for n, start in ((41, 7), (29, 20), (53, 1))]
    return collate(samples, 512)


def loss_and_grads(model, loss_fn, batch):
    (total, count), grads = nn.value_and_grad(model, loss_fn)(model, *map(mx.array, batch.loss_inputs()))
    return total.item(), count.item(), dict(tree_flatten(grads))


@pytest.fixture(scope="module", params=["untied", "tied"])
def model_dir(request, tmp_path_factory):
    shape = TinyShape(tie_embeddings=request.param == "tied")  # 4 query heads over 2 KV heads (GQA)
    return build_tiny_model(tmp_path_factory.mktemp("loss") / request.param, shape)


@pytest.mark.parametrize("fast_math,grad_checkpoint", [(True, False), (False, False), (True, True), (False, True)])
def test_response_loss_equals_full_logits_loss(model_dir, fast_math, grad_checkpoint, monkeypatch):
    monkeypatch.setattr(loss_module, "LOSS_CHUNK_ELEMENTS", 16 * 512)  # 16-row chunks, the last one partial
    model = lora_model(model_dir)
    batch = ragged_batch(model.args.vocab_size)
    assert batch.inputs.shape[1] > 52 and batch.loss_index.size > batch.loss_weight.sum()

    plain_loss, plain_count, plain_grads = loss_and_grads(model, full_logits_cross_entropy, batch)
    fused = partial(response_cross_entropy, fast_math=fast_math, grad_checkpoint=grad_checkpoint)
    loss, count, grads = loss_and_grads(model, fused, batch)

    assert count == plain_count == 34 + 9 + 52  # positions loss_start - 1 .. n - 2 of each
    assert loss == pytest.approx(plain_loss, rel=1e-5)
    assert grads.keys() == plain_grads.keys() and len(grads) == 2 * 3 * model.args.num_hidden_layers
    for name, g in plain_grads.items():
        scale = float(mx.abs(g).max())
        assert scale > 0, name
        np.testing.assert_allclose(np.array(grads[name]), np.array(g), atol=1e-4 * scale, err_msg=name)


def test_compiled_step_matches_the_plain_path(model_dir):
    """The training loop compiles the step; the compiled fused loss gives the same numbers."""
    model = lora_model(model_dir)
    batch = ragged_batch(model.args.vocab_size)
    fused = partial(response_cross_entropy, fast_math=True)
    value_and_grad = nn.value_and_grad(model, fused)
    step = mx.compile(lambda *a: value_and_grad(model, *a), inputs=[model.state], outputs=[model.state])
    (total, _), grads = step(*map(mx.array, batch.loss_inputs()))
    plain_loss, _, plain_grads = loss_and_grads(model, full_logits_cross_entropy, batch)
    assert total.item() == pytest.approx(plain_loss, rel=1e-5)
    for name, g in tree_flatten(grads):
        np.testing.assert_allclose(np.array(g), np.array(plain_grads[name]),
                                   atol=1e-4 * float(mx.abs(plain_grads[name]).max()), err_msg=name)


@pytest.mark.parametrize("vocab_size", [49_152, 32_016, 512])
def test_loss_chunks_cover_every_row_once_in_as_few_even_chunks_as_allowed(vocab_size):
    """No thin remainder: 56 learned rows of SmolLM2's vocabulary are one chunk, not 48 + 8."""
    most = loss_chunk_rows(vocab_size)
    # every count up to a few tiles, and each count near where one more chunk is needed
    counts = set(range(1, 8 * CHUNK_ROW_MULTIPLE)) | {k * most + d for k in (1, 2, 3) for d in range(-40, 41)}
    for rows in sorted(counts):
        chunks = [range(rows)[s] for s in loss_chunks(rows, vocab_size)]
        assert [i for chunk in chunks for i in chunk] == list(range(rows))
        assert len(chunks) == -(-rows // most) and max(map(len, chunks)) <= most
        assert all(len(chunk) % CHUNK_ROW_MULTIPLE == 0 for chunk in chunks[:-1])
        assert len(chunks[-1]) > len(chunks[0]) - CHUNK_ROW_MULTIPLE * len(chunks)
    assert [(s.start, s.stop) for s in loss_chunks(56, 49_152)] == [(0, 64)]
    assert [(s.start, s.stop) for s in loss_chunks(200, 49_152)] == [(0, 112), (112, 224)]


def test_fast_exp_matches_exp_and_keeps_nan():
    """Within 1e-5 over the whole float32 range; below -88 exactly zero, and subnormal (which
    costs Intel CPUs a microcode assist in every operation that meets one) only just above it."""
    x = np.concatenate([np.linspace(-90, 88, 20001), [-1e9, -200.0, 0.0]]).astype(np.float32)
    got = np.array(mx.compile(fast_exp)(mx.array(x)))
    want = np.exp(x.astype(np.float64))
    normal = want > 1e-37
    np.testing.assert_allclose(got[normal], want[normal], rtol=1e-5)
    assert np.all(got[~normal] < 1e-37)
    assert np.all(got[x < -88] == 0)
    subnormal = (got > 0) & (got < np.finfo(np.float32).tiny)
    assert np.all((x[subnormal] > -88) & (x[subnormal] < -87.3))
    assert np.isnan(np.array(fast_exp(mx.array([np.nan], mx.float32)))).all()


def test_masked_attention_probabilities_are_exact_zeros():
    """The causal mask's scores give probabilities of exactly 0, never subnormals, in the
    forward pass and hence in everything the backward pass forms from them."""
    B, H, G, L, D = 1, 4, 2, 48, 16
    q, k, v = (mx.random.normal((B, heads, L, D), key=mx.random.key(i)) for i, heads in enumerate((H, G, G)))
    mask = mx.triu(mx.full((L, L), MASKED_SCORE, mx.float32), k=1)
    probs = np.array(causal_attention(q * D ** -0.5, k, v, mask)[1]).reshape(B, G, H // G, L, L)
    assert np.all(probs[..., np.triu_indices(L, k=1)[0], np.triu_indices(L, k=1)[1]] == 0)
    assert not np.any((probs > 0) & (probs < np.finfo(np.float32).tiny))
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)


LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192}


@pytest.mark.parametrize("rope", [nn.RoPE(64, base=100_000.0), nn.RoPE(128, base=1e6, scale=0.5),
                                  initialize_rope(64, 500_000.0, False, LLAMA3_SCALING, 131_072)],
                         ids=["smollm2", "linear-scaled", "llama3"])
def test_rotate_halves_is_the_models_rope_forward_and_backward(rope):
    B, H, L, D = 2, 3, 300, rope.dims
    x, grad_out = (mx.random.normal((B, H, L, D), key=mx.random.key(i)) for i in range(2))
    (got,), (got_grad,) = mx.vjp(lambda x: apply_rope(rope, x)[0], [x], [grad_out])
    (want,), (want_grad,) = mx.vjp(rope, [x], [grad_out])
    np.testing.assert_allclose(np.array(got), np.array(want), atol=2e-5)
    np.testing.assert_allclose(np.array(got_grad), np.array(want_grad), atol=2e-5)


def test_rope_kinds_without_a_table_keep_the_models_module():
    assert rope_tables(nn.RoPE(32, traditional=True), 8, 32) is None
    assert rope_tables(nn.RoPE(32), 8, 64) is None  # only part of each head rotated


@pytest.mark.parametrize("fast_math", [True, False])
def test_dequantized_matmuls_give_the_quantized_paths_loss_and_gradients(model_dir, fast_math, monkeypatch):
    """On a 4-bit base the CPU path that dequantizes frozen weights inside the step computes
    what MLX's quantized_matmul computes (both use the same 4-bit weights), and it is the path
    that ran: each quantized layer's weight is dequantized, and only when asked."""
    dequantized, float_weight = [], forward._float_weight
    monkeypatch.setattr(forward, "_float_weight", lambda layer, dtype: dequantized.append(layer) or
                        float_weight(layer, dtype))
    model = lora_model(model_dir)
    nn.quantize(model, group_size=32, bits=4, class_predicate=lambda _, m: isinstance(m, (nn.Linear, nn.Embedding))
                and m.weight.shape[-1] % 32 == 0)
    assert quantized_layers(model), "the tiny model has quantizable layers"
    batch = ragged_batch(model.args.vocab_size)
    fused = partial(response_cross_entropy, fast_math=fast_math)
    set_dequantized_matmuls(model, False)
    native_loss, _, native_grads = loss_and_grads(model, fused, batch)
    assert not dequantized
    set_dequantized_matmuls(model, True)
    loss, _, grads = loss_and_grads(model, fused, batch)
    multiplying = [m for m in quantized_layers(model) if isinstance(m, nn.QuantizedLinear)]
    if model.args.tie_word_embeddings:  # the embedding as the output head
        multiplying.append(model.model.embed_tokens)
    assert {id(layer) for layer in dequantized} == {id(layer) for layer in multiplying}
    assert loss == pytest.approx(native_loss, rel=1e-5)
    for name, g in native_grads.items():
        np.testing.assert_allclose(np.array(grads[name]), np.array(g), atol=1e-4 * float(mx.abs(g).max()),
                                   err_msg=name)
