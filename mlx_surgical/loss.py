"""The training loss: token-summed cross-entropy on the learned (response) tokens.

`response_cross_entropy` takes (inputs, targets, loss_index, loss_weight) from
`batches.collate`: loss_index lists the flat (row * width + column) positions whose next token
is learned, padded to a bucket with weight 0, so the compiled step sees few shapes. It returns
the summed loss and the token count; the training loop divides, which keeps gradient
accumulation exact.

It computes logits only at the learned positions, a chunk of rows at a time, and works out the
gradient of each chunk's loss with respect to its hidden states while the chunk's logits exist
(p - onehot, through the output head). So vocab-sized logits never exist for more than one
chunk, in the forward or the backward pass, and the backward pass recomputes nothing.
tests/test_loss.py holds it to the plain full-logits computation.
"""
from functools import partial

import mlx.core as mx

from .errors import UserError
from .forward import fast_exp, hidden_states, output_head, supports_block_forward

# Logits alive at once: about 6M floats (24 MB), 128 rows at SmolLM2's 49,152-token vocabulary,
# 192 at CodeLlama's 32,016. Smaller chunks cost speed (the head matmul gets thin: on an AMD Zen 5
# 56 learned rows took 69 ms in 48-row chunks, 57 in one), larger ones memory and, past ~8M
# floats, speed again (256 rows at 49,152: 224 ms in one chunk, 202 in two).
LOSS_CHUNK_ELEMENTS = 6 * 2 ** 20
# BLAS kernels work on tiles of 16 rows (AVX2 and AVX-512 sgemm alike): a 42-row head matmul
# ran at 112 GFLOP/s, a 48-row one at 180 (SmolLM2's head, AMD Zen 5).
CHUNK_ROW_MULTIPLE = 16


def loss_chunk_rows(vocab_size: int) -> int:
    """The most rows of logits computed at once: about LOSS_CHUNK_ELEMENTS, in whole BLAS tiles."""
    rows = round(LOSS_CHUNK_ELEMENTS / vocab_size / CHUNK_ROW_MULTIPLE) * CHUNK_ROW_MULTIPLE
    return max(rows, CHUNK_ROW_MULTIPLE)


def loss_chunks(rows: int, vocab_size: int) -> list[slice]:
    """The learned rows in as few chunks as loss_chunk_rows allows, of even size in whole tiles:
    a thin remainder (8 rows against the whole vocabulary) runs the head far below BLAS speed."""
    most = loss_chunk_rows(vocab_size)
    even = -(-rows // -(-rows // most))
    size = -(-even // CHUNK_ROW_MULTIPLE) * CHUNK_ROW_MULTIPLE
    return [slice(start, start + size) for start in range(0, rows, size)]


def _chunk_cross_entropy(head, exp):
    """A custom function whose forward returns (loss sum, d loss / d hidden) for a chunk; its
    VJP scales the stored gradient, so the chunk's logits die with the forward pass."""

    @mx.custom_function
    def chunk(hidden, targets, weights):
        logits = head(hidden).astype(mx.float32)
        top = logits.max(axis=-1, keepdims=True)
        # Every vocab-wide pass costs: the shifted logits and the probabilities are never stored,
        # only the exponentials, and the weights are folded into one factor per row.
        e = exp(logits - top)
        total = e.sum(axis=-1, keepdims=True)
        column = targets[:, None]
        target_logit = mx.take_along_axis(logits, column, axis=-1)
        loss = ((mx.log(total) + top - target_logit)[:, 0] * weights).sum()
        row_factor = weights[:, None] / total
        weighted_probs = e * row_factor
        target_grad = (mx.take_along_axis(e, column, axis=-1) - total) * row_factor
        dlogits = mx.put_along_axis(weighted_probs, column, target_grad, axis=-1)
        _, (grad_hidden,) = mx.vjp(head, [hidden], [dlogits.astype(hidden.dtype)])
        return loss, grad_hidden

    @chunk.vjp
    def chunk_vjp(primals, cotangents, outputs):
        _, targets, weights = primals
        return cotangents[0] * outputs[1], mx.zeros_like(targets), mx.zeros_like(weights)

    return chunk


def learned_cross_entropy(model, hidden, targets, loss_index, loss_weight, fast_math: bool = False):
    """The summed loss of the learned positions from final-norm hidden states (batch, length, hidden)."""
    hidden = hidden.reshape(-1, hidden.shape[-1])[loss_index]
    learned = targets.reshape(-1)[loss_index]
    chunk = _chunk_cross_entropy(output_head(model), fast_exp if fast_math else mx.exp)
    total = mx.array(0.0)
    for rows in loss_chunks(hidden.shape[0], model.args.vocab_size):
        # Chunks are independent, so MLX would evaluate them side by side; depending on the
        # previous chunk's loss keeps one chunk's logits alive at a time.
        chunk_hidden = mx.depends(hidden[rows], total) if rows.start else hidden[rows]
        total = total + chunk(chunk_hidden, learned[rows], loss_weight[rows])[0]
    return total


def response_cross_entropy(model, inputs, targets, loss_index, loss_weight, fast_math: bool = False,
                           grad_checkpoint: bool = False):
    hidden = hidden_states(model, inputs, fast_math, grad_checkpoint)
    return learned_cross_entropy(model, hidden, targets, loss_index, loss_weight, fast_math), loss_weight.sum()


def training_loss(model, grad_checkpoint: bool = False, fast_math: bool = False):
    """The training loss for this model; fast_math (CPU only) as tuning.choose_path decided."""
    if grad_checkpoint and not supports_block_forward(model):
        raise UserError("training.grad_checkpoint: not available for models with sliding-window attention layers; "
                        "set it to false")
    return partial(response_cross_entropy, fast_math=fast_math, grad_checkpoint=grad_checkpoint)
