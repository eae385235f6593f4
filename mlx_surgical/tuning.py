"""Which compute path trains fastest on this machine, chosen by measuring it.

On MLX's CPU backend two paths are choices rather than wins: the CPU fast math of forward.py
(an exp from multiply-adds, attention and SwiGLU with their own VJPs) was 1.3x faster than
MLX's own ops on an AMD Zen 5, 1.1x on an Intel Sapphire Rapids (4.7x slower there while its exp
produced subnormals) and equal on a Zen 3;
a quantized base's matmuls can run as MLX's quantized_matmul or as dequantize + float
matmul; and an update's micro-batches can run two at once on two CPU streams, each with a
one-thread BLAS, instead of one at a time on a multi-threaded BLAS (train.py). So the first run
of a model shape on a machine times a few real training steps of
each candidate on the run's own batches, keeps the fastest, and caches the choice (with the
measured rates, which `mlx-surgical doctor` shows) per CPU, BLAS, MLX version and model shape. On
Metal and CUDA the model's own forward with MLX's fused kernels always runs.
"""

import hashlib
import os
import statistics
import time
from dataclasses import asdict, dataclass, replace
from typing import Callable

import mlx.core as mx

from .backend import (blas_thread_count, blas_warning, cache_dir, cpu_description, describe, machine_memory_gb,
                      measure_sgemm_gflops, on_cpu_backend)
from .files import read_json_or_empty, write_json_atomic
from .forward import quantized_layers, set_dequantized_matmuls
from .shape import ModelShape
from .train import accumulate, compiled_grad_step, micro_batch_streams

CHOICES_FILE = "cpu_paths.json"
# Raised whenever a candidate path's code changes speed, so choices measured with the old code
# are measured again (2: forward.fast_exp returns 0 instead of subnormals; 3: RoPE as one fused pass;
# 4: paired micro-batches).
PATHS_REVISION = "4"
# Each round times two micro-batches per stream: timing one micro-batch (or one pair) at a time
# missed the overlap between pairs, and measured pairing level where it trained 1.3x faster.
TIMED_ROUNDS = 3
MICRO_BATCHES_PER_STREAM = 2
# A candidate whose median step is this many times slower than the best is not timed further:
# MLX's quantized_matmul on the CPU can take many seconds per step on a large model.
GIVE_UP_FACTOR = 3.0


@dataclass(frozen=True)
class ComputePath:
    fast_math: bool  # forward.py's CPU fast math, else MLX's own ops
    dequantize: bool  # frozen quantized layers: dequantize + float matmul, else quantized_matmul
    paired: bool = False  # two micro-batches at once on two CPU streams, one BLAS thread each

    def describe(self) -> str:
        parts = ["fast math" if self.fast_math else "MLX ops"]
        parts += ["dequantized matmuls"] * self.dequantize + ["paired micro-batches"] * self.paired
        return ", ".join(parts)


@dataclass
class PathChoice:
    path: ComputePath
    how: str  # "measured", "cached", "set in the config", "not a CPU"
    seconds_per_step: dict  # candidate description -> measured seconds per micro-batch

    def describe(self) -> str:
        rates = describe_rates(self.seconds_per_step)
        return f"compute path: {self.path.describe()} ({self.how}{'; ' + rates if rates else ''})"


def describe_rates(seconds_per_step: dict) -> str:
    rates = ", ".join(f"{name} {seconds * 1000:.0f} ms" for name, seconds in seconds_per_step.items())
    return f"{rates} per micro-batch" if rates else ""


def this_machine() -> dict:
    """What a measured choice holds for: the CPU, the BLAS and its kernel set (faster matmuls
    shift the balance between the paths), how MLX's fused kernels are compiled (vectorised
    elementwise work shifts it too), the MLX version and the revision of our candidates' code."""
    facts = describe()
    return {"cpu": cpu_description(), "blas": facts["blas"], "kernels": facts.get("kernels", ""),
            "mlx": mx.__version__, "paths": PATHS_REVISION}


def doctor_lines() -> list[str]:
    """What `mlx-surgical doctor` prints: the machine, its BLAS and measured speed, and the
    compute paths measured on it that runs now use."""
    gflops = measure_sgemm_gflops()
    memory = machine_memory_gb()
    lines = [f"{'cpu':<8} {cpu_description()}", *(f"{key:<8} {value}" for key, value in describe().items()),
             f"sgemm    {gflops:.1f} GFLOP/s (float32 512x512)",
             f"memory   {memory:.1f} GB" if memory else "memory   unknown"]
    advice = blas_warning() or ("matrix multiply is slow on this machine; expect long runs" if gflops < 10 else None)
    if advice:
        lines.append(f"advice   {advice}")
    choices = choices_in_force()
    for c in choices:
        checkpointed = ", grad_checkpoint" if c["grad_checkpoint"] else ""
        lines.append(f"path     {c['model']} ({c['dtype']}{checkpointed}): {ComputePath(**c['path']).describe()}; "
                     f"measured {c['measured']}: {describe_rates(c['seconds_per_step'])}")
    if not choices:
        lines.append("path     no compute path measured on this CPU, BLAS and MLX yet: the first training run of a "
                     "model measures")
    return lines


def choice_key(shape: ModelShape, dtype: str, grad_checkpoint: bool, pairings: tuple[bool, ...]) -> str:
    """Runs that can pair micro-batches and runs that cannot (one per update) measure apart."""
    parts = [*this_machine().values(), shape.fingerprint(), str(shape.quant_bits), dtype, str(grad_checkpoint),
             str(pairings)]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def cached_choices() -> dict:
    return read_json_or_empty(cache_dir() / CHOICES_FILE)


def choices_in_force() -> list[dict]:
    """The cached choices a run on this machine would use now; others stay cached for when
    their CPU, BLAS or MLX comes back."""
    # Choices cached before the BLAS was recorded (it was part of their key already) count as this BLAS's.
    here = this_machine()
    return [c for c in cached_choices().values() if all(c.get(k, here["blas"] if k == "blas" else None) == v
                                                        for k, v in here.items())]


def candidates(model, fast_math: str, dequantize: str) -> list[ComputePath]:
    """The paths allowed by the settings ("auto" allows both), cheapest to compile first."""
    math_options = {"auto": (False, True), "fast": (True,), "plain": (False,)}[fast_math]
    quantized = bool(quantized_layers(model))
    dequant_options = {"auto": (True, False), "dequantize": (True,), "native": (False,)}[dequantize] \
        if quantized else (False,)
    return [ComputePath(m, d) for d in dequant_options for m in math_options]


def pairing_options(paired: str, accumulation_steps: int, ranks: int) -> tuple[bool, ...]:
    """Whether micro-batches may run in pairs: it takes two of them per update, one process (ranks
    already share the cores), two cores, and an OpenBLAS whose thread count can be set."""
    possible = (accumulation_steps >= 2 and ranks == 1 and (os.cpu_count() or 1) >= 2
                and blas_thread_count() is not None)
    return {"auto": (False, True), "on": (True,), "off": (False,)}[paired] if possible else (False,)


def seconds_per_step(model, loss_for: Callable[[ComputePath], Callable], options: list[ComputePath],
                     batches: list) -> dict[ComputePath, float]:
    """Median seconds per micro-batch of compiled forward + backward steps for each candidate, run
    as the trainer runs an update's micro-batches (`train.accumulate`), so paired candidates also
    get the overlap where one pair ends and the next begins. Every candidate is traced and warmed
    on every batch shape first (which pays for compiling; one whose warm-up steps after the first
    are far slower than another's is not timed), then the candidates are timed in turn,
    round after round, so a change in the machine's load (other programs, a shared host) falls on
    all of them alike."""
    steps = {}

    def run(path, first, per_stream):
        """Runs micro-batches as an update does; returns how many."""
        with micro_batch_streams(path.paired) as streams:
            count = per_stream * len(streams)
            chosen = [batches[(first + i) % len(batches)] for i in range(count)]
            mx.eval(accumulate(steps[path], streams, chosen, list(range(count))))
        return count

    times: dict[ComputePath, list[float]] = {path: [] for path in options}
    warm: dict[ComputePath, float] = {}  # each candidate's fastest warm-up step after its first
    for path in options:
        # The layers' matmul path is read when the step is traced, so each trace keeps its own.
        set_dequantized_matmuls(model, path.dequantize)
        steps[path] = compiled_grad_step(model, loss_for(path), [model.state, mx.random.state])
        for first in range(len(batches)):
            tic = time.perf_counter()
            count = run(path, first, 1)
            if first == 0:  # where its kernels compile
                continue
            warm[path] = min(warm.get(path, float("inf")), (time.perf_counter() - tic) / count)
            # MLX's quantized_matmul took 17 s a micro-batch of SmolLM2 on an AMD Zen 4: not worth timing.
            if warm[path] > GIVE_UP_FACTOR * min(warm.values()):
                del steps[path]
                times[path].append(warm[path])
                break
    for i in range(TIMED_ROUNDS):
        for path in list(steps):
            tic = time.perf_counter()
            count = run(path, i, MICRO_BATCHES_PER_STREAM)
            times[path].append((time.perf_counter() - tic) / count)
        best = min(statistics.median(t) for t in times.values())
        steps = {p: s for p, s in steps.items() if statistics.median(times[p]) <= GIVE_UP_FACTOR * best}
    return {path: statistics.median(t) for path, t in times.items()}


def measure(model, loss_for: Callable[[ComputePath], Callable], options: list[ComputePath],
            pairings: tuple[bool, ...], batches: list) -> tuple[ComputePath, dict[ComputePath, float]]:
    """The fastest allowed path and the timings: the compute paths first, then the fastest of
    them paired against unpaired (pairing helps or hurts each path alike, so the pairs of the
    others are not worth their compile time)."""
    timings = seconds_per_step(model, loss_for, options, batches) if len(options) > 1 else {}
    best = min(timings, key=timings.get) if timings else options[0]
    if len(pairings) > 1:
        timings.update(seconds_per_step(model, loss_for, [best, replace(best, paired=True)], batches))
        best = min(timings, key=timings.get)
    elif pairings == (True,):
        best = replace(best, paired=True)
    return best, timings


def choose_path(model, shape: ModelShape, dtype: str, grad_checkpoint: bool, fast_math: str, dequantize: str,
                loss_for: Callable[[ComputePath], Callable], batches: list,
                log: Callable[[str], None] = print, pairings: tuple[bool, ...] = (False,)) -> PathChoice:
    """The compute path for this run, applied to the model (quantized layers switched).
    pairings: whether micro-batches may run in pairs (`pairing_options`)."""
    if not on_cpu_backend():
        return PathChoice(ComputePath(False, False), "not a CPU", {})
    options = candidates(model, fast_math, dequantize)
    allowed = [replace(path, paired=paired) for path in options for paired in pairings]
    key = choice_key(shape, dtype, grad_checkpoint, pairings)
    cached = cached_choices().get(key)
    if len(allowed) == 1:
        choice = PathChoice(allowed[0], "set in the config", {})
    elif cached and ComputePath(**cached["path"]) in allowed:
        choice = PathChoice(ComputePath(**cached["path"]), "cached", cached["seconds_per_step"])
    else:
        # The paths, then the fastest of them paired (measure): one more where pairing may be chosen.
        count = len(options) + (len(pairings) > 1)
        log(f"measuring {count} compute paths on this CPU ({cpu_description()}); once per model shape")
        fastest, timings = measure(model, loss_for, options, pairings, batches)
        choice = PathChoice(fastest, "measured", {p.describe(): s for p, s in timings.items()})
        choices = cached_choices()
        choices[key] = {**this_machine(), "model": shape.describe(), "dtype": dtype,
                        "grad_checkpoint": grad_checkpoint, "path": asdict(fastest),
                        "seconds_per_step": choice.seconds_per_step, "measured": time.strftime("%Y-%m-%d %H:%M")}
        write_json_atomic(cache_dir() / CHOICES_FILE, choices)
    set_dequantized_matmuls(model, choice.path.dequantize)
    return choice
