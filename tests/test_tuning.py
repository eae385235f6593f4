"""The compute path is measured once per machine and model shape, cached, and can be forced."""

import json
import os

import mlx.core as mx
import mlx.nn as nn
import pytest

from mlx_surgical.backend import CACHE_ENV, blas_thread_count, cpu_description
from mlx_surgical.batches import BatchStream
from mlx_surgical.config import LoraConfig
from mlx_surgical.data import read_records, sample_path
from mlx_surgical.forward import DequantizingLinear, quantized_layers
from mlx_surgical.loss import training_loss
from mlx_surgical.model import load_model
from mlx_surgical.prompt import PromptFormat, encode_records
from mlx_surgical.rundir import RunInfo
from mlx_surgical.surgery import attach_lora
from mlx_surgical.train import accumulate
from mlx_surgical import tuning
from mlx_surgical.tuning import (CHOICES_FILE, GIVE_UP_FACTOR, TIMED_ROUNDS, ComputePath, choices_in_force,
                                 choose_path, pairing_options, seconds_per_step)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache" / CHOICES_FILE


def prepared(tiny_model, quantize=False):
    loaded = load_model(str(tiny_model), dtype="float32")
    if quantize:
        nn.quantize(loaded.model, group_size=32, bits=4)
    attach_lora(loaded.model, LoraConfig(), seed=0)
    records = read_records(sample_path("train"))[:4]
    samples = encode_records(records, PromptFormat(loaded.tokenizer), 512, "truncate", True).samples
    stream = BatchStream(samples, 1, 0, 512)
    return loaded, [stream.batch(i) for i in range(2)]


def choose(loaded, batches, cpu_math="auto", quantized="auto", pairings=(False,), log=lambda _: None):
    return choose_path(loaded.model, loaded.shape, "float32", False, cpu_math, quantized,
                       lambda path: training_loss(loaded.model, False, path.fast_math), batches, log=log,
                       pairings=pairings)


def test_auto_measures_once_then_uses_the_cached_choice(tiny_model, cache):
    loaded, batches = prepared(tiny_model)
    first = choose(loaded, batches)
    assert first.how == "measured" and set(first.seconds_per_step) == {"MLX ops", "fast math"}
    assert all(s > 0 for s in first.seconds_per_step.values())
    assert first.seconds_per_step[first.path.describe()] == min(first.seconds_per_step.values())
    [entry] = json.loads(cache.read_text()).values()
    assert entry["cpu"] == cpu_description() and entry["path"]["fast_math"] == first.path.fast_math
    again = choose(loaded, batches)
    assert (again.how, again.path) == ("cached", first.path)
    assert choices_in_force() == [entry]

    # A choice measured under another BLAS kernel set stays cached but is not the one in force.
    cache.write_text(json.dumps({"elsewhere": {**entry, "blas": "OpenBLAS, SkylakeX kernels"}, "here": entry}))
    assert choices_in_force() == [entry]


def test_a_forced_setting_is_not_measured(tiny_model, cache):
    loaded, batches = prepared(tiny_model)
    assert choose(loaded, batches, cpu_math="plain").path.fast_math is False
    forced = choose(loaded, batches, cpu_math="fast")
    assert forced.path.fast_math is True and forced.how == "set in the config"
    assert not cache.exists()


def test_pairing_is_measured_on_the_fastest_path_and_can_be_forced(tiny_model, cache):
    can_pair = (os.cpu_count() or 1) >= 2 and blas_thread_count() is not None
    assert pairing_options("auto", 4, 1) == ((False, True) if can_pair else (False,))
    assert pairing_options("auto", 1, 1) == pairing_options("on", 4, 2) == pairing_options("off", 4, 1) == (False,)
    loaded, batches = prepared(tiny_model)
    said = []
    choice = choose(loaded, batches, pairings=(False, True), log=said.append)
    unpaired = min(("MLX ops", "fast math"), key=choice.seconds_per_step.get)
    assert set(choice.seconds_per_step) == {"MLX ops", "fast math", f"{unpaired}, paired micro-batches"}
    assert said[0].startswith("measuring 3 compute paths on this CPU")
    assert choice.seconds_per_step[choice.path.describe()] == min(choice.seconds_per_step.values())
    assert choose(loaded, batches, pairings=(False, True)).how == "cached"
    # Runs that cannot pair keep their own measured choice.
    assert choose(loaded, batches).how == "measured" and len(json.loads(cache.read_text())) == 2
    forced = choose(loaded, batches, cpu_math="plain", pairings=(True,))
    assert (forced.how, forced.path.describe()) == ("set in the config", "MLX ops, paired micro-batches")


def test_a_far_slower_candidate_is_given_up_after_its_warm_up(tiny_model, cache, monkeypatch):
    loaded, batches = prepared(tiny_model)

    def loss_for(path):
        loss = training_loss(loaded.model, False, path.fast_math)
        if not path.fast_math:
            return loss

        def slowed(model, *inputs):  # the same loss after ~20 GFLOP of work it does not use
            loss_sum, ntoks = loss(model, *inputs)
            square = wasted = mx.full((1024, 1024), 1e-3)
            for _ in range(10):
                wasted = wasted @ square
            return loss_sum + 0 * wasted.sum(), ntoks
        return slowed

    runs = []
    monkeypatch.setattr(tuning, "accumulate", lambda step, *args: runs.append(step) or accumulate(step, *args))
    timings = seconds_per_step(loaded.model, loss_for, [ComputePath(False, False), ComputePath(True, False)], batches)
    plain, slow = dict.fromkeys(runs)
    assert runs.count(plain) == len(batches) + TIMED_ROUNDS and runs.count(slow) == len(batches)
    assert timings[ComputePath(True, False)] > GIVE_UP_FACTOR * timings[ComputePath(False, False)]


def test_a_quantized_base_also_chooses_its_matmul(tiny_model, cache):
    loaded, batches = prepared(tiny_model, quantize=True)
    choice = choose(loaded, batches, cpu_math="plain")
    assert {"MLX ops", "MLX ops, dequantized matmuls"} <= set(choice.seconds_per_step)
    layers = quantized_layers(loaded.model)
    assert layers and all(isinstance(m, DequantizingLinear) or hasattr(m, "dequantize") for m in layers)
    assert all(m.dequantize == choice.path.dequantize for m in layers)


def test_the_run_records_its_compute_path(trained_run):
    assert RunInfo.load(trained_run).compute_path.startswith("compute path: ")
