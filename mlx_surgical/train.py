"""The training loop: compiled gradient step, gradient accumulation, schedule, evaluation.

`train` receives everything that varies as arguments (the loss, the batches, the
callbacks), so fresh, resumed, QLoRA and data-parallel runs use this one loop. Progress reaches the
console, the metrics file and the server only through callbacks.

The loss function (see `loss.py`) is called as loss_fn(model, *batch.loss_inputs()).
Accumulation is exact: it returns a token-summed loss and its token
count, the gradients of the sums are added over the micro-batches, and the update divides
by the total token count. So batch 1 x 4 steps gives the same update as batch 4.
"""

import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import cache, partial
from typing import Callable, Optional, Protocol

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map

from .backend import blas_threads
from .batches import Batch
from .checkpoint import TrainState
from .config import DEFAULT_EPOCHS, TrainingConfig
from .errors import TrainingDiverged, TrainingInterrupted


@dataclass(frozen=True)
class Schedule:
    examples: int
    micro_batches_per_epoch: int
    micro_batches: int
    updates: int
    warmup_updates: int
    epochs: float

    def to_dict(self) -> dict:
        return asdict(self)


def schedule_for(examples: int, training: TrainingConfig) -> Schedule:
    """Epochs (or iters) as a number of optimizer updates. Each epoch is ceil(examples / batch
    size) micro-batches and every update takes grad_accumulation_steps of them; when the
    epochs do not divide evenly, the last update completes its window from the next epoch's
    order."""
    per_epoch = -(-examples // training.batch_size)
    if training.iters is not None:
        updates = training.iters
        micro = updates * training.grad_accumulation_steps
    else:
        epochs = training.epochs or DEFAULT_EPOCHS
        micro = per_epoch * epochs
        updates = -(-micro // training.grad_accumulation_steps)
    return Schedule(examples, per_epoch, micro, updates, min(training.warmup_steps, updates),
                    micro / per_epoch if per_epoch else 0.0)


def learning_rate_schedule(peak: float, minimum: float, warmup: int, total: int, kind: str):
    """Linear warmup from peak/warmup to peak over `warmup` updates, then decay to `minimum`
    by the last update. MLX evaluates the schedule at the optimizer's step count before each
    update, so update k (0-based) runs at schedule(k)."""
    decay_steps = max(total - warmup, 1)
    decay = {
        "cosine": lambda: optim.cosine_decay(peak, decay_steps, minimum),
        "linear": lambda: optim.linear_schedule(peak, minimum, decay_steps),
        "constant": lambda: (lambda step: mx.array(peak, mx.float32)),
    }[kind]()
    if warmup <= 0:
        return decay
    ramp = optim.linear_schedule(peak / warmup, peak, max(warmup - 1, 1)) if warmup > 1 else (lambda s: peak)
    return optim.join_schedules([ramp, decay], [warmup])


def make_optimizer(learning_rate, weight_decay: float) -> optim.AdamW:
    # Bias-corrected like PyTorch's AdamW, so recipes carry over; weight decay is decoupled.
    return optim.AdamW(learning_rate=learning_rate, weight_decay=weight_decay, bias_correction=True)


class Callback(Protocol):
    """Every hook is optional; a callback implements the ones it needs."""

    def on_start(self, info: dict) -> None: ...
    def on_update(self, report: dict, state: TrainState) -> None: ...
    def on_eval(self, report: dict, state: TrainState, improved: bool) -> None: ...
    def on_stop(self, reason: str, state: TrainState) -> None: ...


@dataclass
class LoopSettings:
    total_updates: int
    grad_accumulation_steps: int
    eval_every: int
    patience: int = 0
    seed: int = 0
    world: Optional[object] = None  # an mx.distributed group of data-parallel ranks, or None
    paired: bool = False  # two micro-batches at once on two CPU streams (tuning.py measures it)


def dropout_seed(seed: int, position: int, rank: int = 0) -> int:
    """Each micro-batch draws its dropout masks from a key fixed by (seed, position, rank), so
    a resumed run needs no saved random state to continue exactly. Wrapped to MLX's 64-bit seed:
    within a run (seed fixed) every position and rank still get their own key."""
    return (((seed % 2 ** 31) * 2 ** 32 + position) * 1024 + rank) % 2 ** 64


@dataclass
class LoopResult:
    stopped_early: bool
    final_val_loss: Optional[float]


def _emit(callbacks, hook: str, *args):
    for cb in callbacks:
        fn = getattr(cb, hook, None)
        if fn is not None:
            fn(*args)


@cache
def _second_cpu_stream():
    return mx.new_stream(mx.cpu)


@contextmanager
def micro_batch_streams(paired: bool):
    """The streams micro-batches take in turn: the default one, and when paired a second CPU
    stream too, with OpenBLAS on one thread meanwhile, so each stream's matmuls keep one core
    and each core also does its stream's elementwise work (MLX runs those on one thread)."""
    default = mx.default_stream(mx.default_device())
    with blas_threads(1 if paired else None):
        yield [default, _second_cpu_stream()] if paired else [default]


def accumulate(grad_step, streams: list, batches: list[Batch], seeds: list[int]):
    """(loss sum, token count, summed gradients) of an update's micro-batches, queued for
    evaluation: each drawing its dropout masks from its seed, taking the streams in turn."""
    grads, loss_total, tok_total = None, mx.array(0.0), mx.array(0.0)
    for i, (batch, seed) in enumerate(zip(batches, seeds)):
        mx.random.seed(seed)
        with mx.stream(streams[i % len(streams)]):
            loss_sum, ntoks, g = grad_step(*map(mx.array, batch.loss_inputs()))
            grads = g if grads is None else tree_map(mx.add, grads, g)
            loss_total, tok_total = loss_total + loss_sum, tok_total + ntoks
        # Not waiting here lets Python build the next graph while this one computes: 206 -> 213
        # tokens/s on SmolLM2's shape (AMD Zen 5). A pair is queued at once, as MLX interleaves
        # two streams' work only within one evaluation.
        if (i + 1) % len(streams) == 0 or i == len(batches) - 1:
            mx.async_eval(grads, loss_total, tok_total)
    return loss_total, tok_total, grads


def evaluate(model, loss_fn, batches, paired: bool = False) -> Optional[float]:
    """Token-weighted mean loss over all batches (with dropout off)."""
    model.eval()
    total, count = mx.array(0.0), mx.array(0.0)
    with micro_batch_streams(paired) as streams:
        for i, batch in enumerate(batches):
            with mx.stream(streams[i % len(streams)]):
                loss_sum, ntoks = loss_fn(model, *map(mx.array, batch.loss_inputs()))
                total, count = total + loss_sum, count + ntoks
            if (i + 1) % len(streams) == 0:
                mx.eval(total, count)
        mx.eval(total, count)
    model.train()
    return (total / count).item() if count.item() > 0 else None


def compiled_grad_step(model, loss_fn: Callable, compiled_state: list) -> Callable:
    """(loss sum, token count, gradients) of one micro-batch, as one compiled graph."""
    value_and_grad = nn.value_and_grad(model, loss_fn)

    @partial(mx.compile, inputs=compiled_state, outputs=compiled_state)
    def grad_step(*loss_inputs):
        (loss_sum, ntoks), grads = value_and_grad(model, *loss_inputs)
        return loss_sum, ntoks, grads

    return grad_step


def train(model, optimizer, loss_fn: Callable, batch_at: Callable[[int], Batch], settings: LoopSettings,
          state: TrainState, eval_fn: Optional[Callable[[], Optional[float]]] = None,
          callbacks: tuple[Callback, ...] = (), should_stop: Callable[[], bool] = lambda: False) -> LoopResult:
    """Run optimizer updates from `state.update` to `settings.total_updates`.

    batch_at(position) returns the micro-batch at a position in the data order, so a resumed
    loop continues exactly where the checkpoint left off. should_stop is polled after every
    update (Ctrl-C, a stop request): the callbacks see on_stop("interrupted") at a clean
    update boundary, where a checkpoint resumes exactly, and TrainingInterrupted is raised.
    """
    accum = settings.grad_accumulation_steps
    world = settings.world
    ranks, rank = (world.size(), world.rank()) if world is not None else (1, 0)

    def across_ranks(x, stream=None):
        """Sum over data-parallel ranks (identity for one process). Scalars outside the
        compiled step go through the CPU stream, as mlx-lm's trainer does."""
        return mx.distributed.all_sum(x, group=world, stream=stream) if ranks > 1 else x
    compiled_state = [model.state, optimizer.state, mx.random.state]
    grad_step = compiled_grad_step(model, loss_fn, compiled_state)

    @partial(mx.compile, inputs=compiled_state, outputs=compiled_state)
    def apply_update(grads, ntoks):
        """One optimizer update; returns whether every weight and moment is still finite."""
        grads = tree_map(across_ranks, grads)
        optimizer.update(model, tree_map(lambda g: g / ntoks, grads))
        values = [v for _, v in tree_flatten([model.trainable_parameters(), optimizer.state])
                  if mx.issubdtype(v.dtype, mx.floating)]
        return mx.all(mx.stack([mx.all(mx.isfinite(v)) for v in values]))

    model.train()
    final_val = None
    stopped_early = False
    _emit(callbacks, "on_start", {"total_updates": settings.total_updates, "update": state.update})
    session_seconds, session_updates = 0.0, 0  # the time left is foretold from this process's own pace
    with micro_batch_streams(settings.paired) as streams:
        while state.update < settings.total_updates:
            tic = time.perf_counter()
            positions = range(state.position, state.position + accum)
            batches = [batch_at(position) for position in positions]
            loss_total, tok_total, grads = accumulate(grad_step, streams, batches,
                                                      [dropout_seed(settings.seed, p, rank) for p in positions])
            tokens = sum(batch.tokens for batch in batches)
            loss_total, tok_total = across_ranks(loss_total, mx.cpu), across_ranks(tok_total, mx.cpu)
            tokens = int(across_ranks(mx.array(tokens), mx.cpu).item())
            loss = (loss_total / mx.maximum(tok_total, 1)).item()
            if not math.isfinite(loss):
                raise TrainingDiverged(f"training: loss became {loss} at update {state.update + 1} "
                                       "(a learning rate too high for this data, or a broken example).")
            finite = apply_update(grads, tok_total)
            mx.eval(model.trainable_parameters(), optimizer.state, finite)
            if not finite.item():  # the weights in memory are lost; the callbacks must not save them
                raise TrainingDiverged(f"training: the weights became NaN or infinite at update {state.update + 1} "
                                       "(a learning rate too high for this data).")

            seconds = time.perf_counter() - tic
            state.update += 1
            state.position += accum
            state.tokens += tokens
            state.train_seconds += seconds
            session_seconds, session_updates = session_seconds + seconds, session_updates + 1
            report = {"update": state.update, "total_updates": settings.total_updates, "loss": loss,
                      "learning_rate": optimizer.learning_rate.item(), "tokens_per_second": tokens / seconds,
                      "tokens": state.tokens, "seconds": seconds, "peak_memory_gb": mx.get_peak_memory() / 1e9,
                      "eta_seconds": session_seconds / session_updates * (settings.total_updates - state.update)}
            _emit(callbacks, "on_update", report, state)

            last = state.update == settings.total_updates
            if eval_fn is not None and (state.update % settings.eval_every == 0 or last):
                val_loss = eval_fn()
                final_val = val_loss
                improved = val_loss is not None and (state.best_val_loss is None or val_loss < state.best_val_loss)
                if improved:
                    state.best_val_loss, state.best_update, state.evals_since_best = val_loss, state.update, 0
                else:
                    state.evals_since_best += 1
                _emit(callbacks, "on_eval", {"update": state.update, "val_loss": val_loss}, state, improved)
                if settings.patience and state.evals_since_best >= settings.patience and not last:
                    stopped_early = True
                    _emit(callbacks, "on_stop", "early_stopping", state)
                    break
            # Every rank must stop at the same update, or the others would wait in all_sum forever.
            if not last and across_ranks(mx.array(int(should_stop())), mx.cpu).item() > 0:
                _emit(callbacks, "on_stop", "interrupted", state)
                raise TrainingInterrupted(f"stopped at update {state.update} of {settings.total_updates}")
    return LoopResult(stopped_early, final_val)
