"""The training engine on the tiny model: exact accumulation, schedule, counts, NaN, resume."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from tqdm import tqdm

from mlx_surgical.adapter import AdapterConfig, PromptRecord
from mlx_surgical.backend import blas_thread_count
from mlx_surgical.batches import collate
from mlx_surgical.callbacks import Checkpointer
from mlx_surgical.checkpoint import TrainState, latest_checkpoint
from mlx_surgical.config import LoraConfig, TrainingConfig, is_plain_name, save_config
from mlx_surgical.console import resume_command
from mlx_surgical.errors import TrainingDiverged, TrainingInterrupted, UserError
from mlx_surgical.loss import training_loss
from mlx_surgical.model import load_model
from mlx_surgical.pipeline import resume_run, train_run
from mlx_surgical.plan import lora_parameter_count
from mlx_surgical.registry import list_adapters
from mlx_surgical.rundir import RunDir
from mlx_surgical.prompt import Sample
from mlx_surgical.surgery import HashDropout, attach_lora
from mlx_surgical.train import (LoopSettings, evaluate, learning_rate_schedule, make_optimizer, schedule_for,
                                train)


def lora_weights(model) -> dict:
    return {k: np.array(v) for k, v in tree_flatten(model.trainable_parameters())}


def fresh_lora_model(tiny_model, dropout=0.0):
    loaded = load_model(str(tiny_model))
    attach_lora(loaded.model, LoraConfig(dropout=dropout), seed=3)
    return loaded


def run_updates(tiny_model, batches, accum, updates, paired=False, dropout=0.0, eval_fn=None):
    loaded = fresh_lora_model(tiny_model, dropout)
    optimizer = make_optimizer(1e-2, 0.01)
    optimizer.init(loaded.model.trainable_parameters())
    loss_fn = training_loss(loaded.model)
    train(loaded.model, optimizer, loss_fn, lambda position: batches[position],
          LoopSettings(updates, accum, eval_every=1, paired=paired), TrainState(),
          eval_fn and (lambda: eval_fn(loaded.model, loss_fn)))
    return lora_weights(loaded.model)


def test_accumulation_is_exactly_a_larger_batch(tiny_model):
    """Micro-batches with different numbers of learned tokens: the update divides the summed loss by
    all of them, as one batch does (averaging each micro-batch's mean would weight them wrongly)."""
    rng = np.random.default_rng(0)
    samples = [Sample(rng.integers(3, 500, size=30 + 7 * i).astype(np.int32), loss_start=12, origin=str(i))
               for i in range(8)]
    one_by_four = [collate([s], 512) for s in samples]
    four_at_once = [collate(samples[:4], 512), collate(samples[4:], 512)]
    accumulated = run_updates(tiny_model, one_by_four, accum=4, updates=2)
    batched = run_updates(tiny_model, four_at_once, accum=1, updates=2)
    assert accumulated.keys() == batched.keys()
    for name in batched:
        np.testing.assert_allclose(accumulated[name], batched[name], atol=1e-4, rtol=1e-4)
    untouched = fresh_lora_model(tiny_model)
    assert any(np.abs(batched[k] - v).max() > 1e-4 for k, v in lora_weights(untouched.model).items())


def test_paired_micro_batches_train_the_same_adapter(tiny_model):
    """Two micro-batches at once on two CPU streams (one BLAS thread each): the same masks, sums
    and update as one at a time, and the BLAS gets its threads back afterwards."""
    rng = np.random.default_rng(1)
    batches = [collate([Sample(rng.integers(3, 500, size=40 + i).astype(np.int32), loss_start=10, origin=str(i))],
                       512) for i in range(9)]
    valid = batches[:3]  # an odd count: the last batch of the validation loss has no partner
    threads_before = blas_thread_count()
    losses, threads = {}, {}

    def validation(paired):
        def run(model, loss_fn):
            threads[paired] = blas_thread_count()
            losses.setdefault(paired, []).append(evaluate(model, loss_fn, valid, paired))
            return losses[paired][-1]
        return run

    one_at_a_time = run_updates(tiny_model, batches, accum=3, updates=3, dropout=0.1, eval_fn=validation(False))
    paired = run_updates(tiny_model, batches, accum=3, updates=3, paired=True, dropout=0.1, eval_fn=validation(True))
    for name in one_at_a_time:
        np.testing.assert_allclose(paired[name], one_at_a_time[name], atol=2e-6, rtol=1e-5)
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-6)
    assert len(losses[True]) == 3 and threads[False] == threads_before
    assert blas_thread_count() == threads_before
    if threads_before is not None:  # OpenBLAS loaded: one thread per stream while paired
        assert threads[True] == 1


def test_warmup_then_cosine_linear_or_constant_counted_in_updates():
    schedule = learning_rate_schedule(1e-3, 1e-5, warmup=4, total=20, kind="cosine")
    rates = [schedule(mx.array(step)).item() for step in range(20)]
    assert rates[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert rates[4] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(rates[4:], rates[5:]))
    assert rates[19] == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5 * (1 + math.cos(math.pi * 15 / 16)), rel=1e-4)
    linear = learning_rate_schedule(1e-3, 1e-5, warmup=4, total=20, kind="linear")
    assert [linear(mx.array(step)).item() for step in (0, 4, 19)] == pytest.approx(
        [2.5e-4, 1e-3, 1e-3 + (1e-5 - 1e-3) * 15 / 16], rel=1e-4)
    constant = learning_rate_schedule(1e-3, 1e-5, warmup=4, total=20, kind="constant")
    assert [constant(mx.array(step)).item() for step in (0, 4, 19)] == pytest.approx([2.5e-4, 1e-3, 1e-3])


def test_epochs_become_a_known_number_of_updates():
    surgical = TrainingConfig(epochs=25, batch_size=1, grad_accumulation_steps=4, warmup_steps=50)
    assert schedule_for(116, surgical).updates == 725
    assert schedule_for(116, TrainingConfig(iters=10)).updates == 10


def test_trainable_parameters_are_exactly_the_target_projections(tiny_model):
    loaded = load_model(str(tiny_model))
    lora = LoraConfig()
    count = attach_lora(loaded.model, lora, seed=0)
    assert count == lora_parameter_count(loaded.shape, lora)
    names = [k for k, _ in tree_flatten(loaded.model.trainable_parameters())]
    assert {n.split(".")[-2] for n in names} == {"q_proj", "k_proj", "v_proj"}
    assert {n.split(".")[-1] for n in names} == {"lora_a", "lora_b"}
    last_one = load_model(str(tiny_model))
    assert attach_lora(last_one.model, LoraConfig(layers=1), seed=0) == count // loaded.shape.num_layers


def test_lora_dropout_drops_the_configured_fraction_and_is_seeded(tiny_model):
    loaded = load_model(str(tiny_model))
    attach_lora(loaded.model, LoraConfig(dropout=0.2), seed=0)
    dropouts = [m for _, m in loaded.model.named_modules() if isinstance(m, HashDropout)]
    assert len(dropouts) == 3 * loaded.shape.num_layers
    dropout, x = dropouts[0], mx.ones((400, 500))
    mx.random.seed(3)
    first = np.array(dropout(x))
    mx.random.seed(3)
    assert np.array_equal(np.array(dropout(x)), first)
    assert not np.array_equal(np.array(dropout(x)), first)
    assert abs((first == 0).mean() - 0.2) < 0.005 and np.allclose(first[first > 0], 1 / 0.8)
    # Neighbouring elements are not correlated (the hash mixes the index well).
    kept = (first > 0).ravel().astype(float)
    assert abs(np.corrcoef(kept[:-1], kept[1:])[0, 1]) < 0.01
    dropout.eval()
    assert np.array_equal(np.array(dropout(x)), np.array(x))


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_checkpoint(tiny_model, tmp_path):
    loaded = fresh_lora_model(tiny_model)
    optimizer = make_optimizer(1e-3, 0.0)
    optimizer.init(loaded.model.trainable_parameters())
    good = collate([Sample(np.arange(3, 40, dtype=np.int32), 5, "good")], 512)
    poisoned = collate([Sample(np.arange(4, 41, dtype=np.int32), 5, "poisoned")], 512)

    def loss_that_diverges(model, inputs, *rest):
        # The step is compiled, so the NaN must come from the data, not from Python state.
        loss, ntoks = training_loss(model)(model, inputs, *rest)
        return mx.where(inputs[0, 0] == 4, mx.array(float("nan")), loss), ntoks

    adapter_config = AdapterConfig.for_run(LoraConfig(), loaded.shape, str(tiny_model), str(tiny_model), PromptRecord())
    checkpointer = Checkpointer(tmp_path, loaded.model, optimizer, adapter_config, save_every=2, keep=2)
    state = TrainState()
    with pytest.raises(TrainingDiverged, match="loss became nan at update 3"):
        train(loaded.model, optimizer, loss_that_diverges, lambda p: good if p < 4 else poisoned,
              LoopSettings(10, 2, eval_every=10 ** 9), state, callbacks=(checkpointer,))
    assert latest_checkpoint(tmp_path).name == "update-0000002"
    assert state.update == 2


def test_run_directory_and_mlx_lm_loads_the_adapter(make_config):
    from mlx_lm.utils import load

    result = train_run(make_config(), progress=False, log=lambda _: None)
    run = result.run_dir
    for name in ("adapters.safetensors", "adapter_config.json", "run.json", "run_config.json", "metrics.jsonl",
                 "loss.png", "best/adapters.safetensors"):
        assert (run / name).exists(), name
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "succeeded" and info["trainable_parameters"] == result.trainable_parameters
    assert info["data"]["hash"] and info["versions"]["mlx"]
    base = json.loads((run / "adapter_config.json").read_text())["base_model"]
    assert base["fingerprint"] and Path(base["resolved_path"]).is_absolute()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"update", "loss", "learning_rate", "tokens_per_second", "peak_memory_gb"} <= rows[0].keys()
    assert any("val_loss" in r for r in rows)

    # mlx-lm's own loader takes the run directory as it is, and applies the same weights.
    model, tokenizer = load(base["path"], adapter_path=str(run))
    ours = dict(tree_flatten(model.trainable_parameters()))
    saved = mx.load(str(run / "adapters.safetensors"))
    assert ours.keys() >= saved.keys()
    for k, v in saved.items():
        assert mx.array_equal(ours[k], v)


def test_early_stopping_keeps_the_best_adapter(make_config):
    # A learning rate this high makes validation worse after the first evaluation.
    result = train_run(make_config(iters=40, eval_every=2, patience=2, learning_rate=0.5), progress=False,
                       log=lambda _: None)
    info = json.loads((result.run_dir / "run.json").read_text())
    assert result.status == "stopped_early" and info["status"] == "stopped_early"
    assert result.updates < 40
    best = json.loads((result.run_dir / "best" / "adapter_config.json").read_text())
    assert best["val_loss"] == pytest.approx(result.best_val_loss)
    assert result.updates == best["update"] + 2 * 2


def _start(config_path: Path, *extra):
    return subprocess.Popen([sys.executable, "-m", "mlx_surgical", "train", *extra, "--no-progress"]
                            + ([str(config_path)] if config_path else []),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(path_glob: Path, pattern: str, proc, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if list(path_glob.glob(pattern)):
            return
        if proc.poll() is not None:
            pytest.fail(f"training ended before {pattern} appeared:\n{proc.stdout.read()}")
        time.sleep(0.02)
    pytest.fail(f"{pattern} did not appear")


@pytest.mark.parametrize("how", ["sigkill", "ctrl-c"])
def test_killed_run_resumes_to_the_same_adapter(make_config, tmp_path, how):
    def config_file(name):
        config = make_config(iters=16, save_every=4, eval_every=8, grad_accumulation_steps=3)
        config.lora.dropout = 0.1  # the random state must be restored too
        config.output.name = name
        path = tmp_path / f"{name}.json"
        save_config(config, path)
        return path, Path(config.output.dir) / name

    straight_cfg, straight_dir = config_file("straight")
    assert _start(straight_cfg).wait() == 0

    cut_cfg, cut_dir = config_file("cut")
    proc = _start(cut_cfg)
    _wait_for(cut_dir / "checkpoints", "update-0000004", proc)
    if how == "sigkill":
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL
    else:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 130, out
        assert "stopping after this update, saving a checkpoint (press again to abort)" in out
        assert f"checkpoint saved. Continue with: {resume_command(cut_dir)}" in out and "Traceback" not in out
        assert json.loads((cut_dir / "run.json").read_text())["status"] == "interrupted"
    assert json.loads((cut_dir / "run.json").read_text())["status"] != "succeeded"

    resumed = _start(None, "--resume", str(cut_dir))
    out, _ = resumed.communicate(timeout=240)
    assert resumed.returncode == 0, out
    assert "resuming" in out
    a, b = mx.load(str(straight_dir / "adapters.safetensors")), mx.load(str(cut_dir / "adapters.safetensors"))
    for name in a:
        np.testing.assert_allclose(np.array(a[name]), np.array(b[name]), atol=1e-5)
    rows = [json.loads(line) for line in (cut_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["update"] for r in rows if "loss" in r] == list(range(1, 17))


def test_a_second_ctrl_c_while_the_stopped_run_exits_prints_no_traceback(make_config, tmp_path):
    """The checkpoint is saved and the hint printed; a user pressing Ctrl-C again while the process
    exits must not get a traceback from the interpreter's shutdown."""
    config = make_config(iters=40, save_every=2)
    path = tmp_path / "run.json"
    save_config(config, path)
    proc = _start(path)
    _wait_for(Path(config.output.dir) / "run" / "checkpoints", "update-0000002", proc)
    proc.send_signal(signal.SIGINT)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "checkpoint saved. Continue with:" in line:
            proc.send_signal(signal.SIGINT)
            break
    out = "".join(lines) + proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, out
    assert "Traceback" not in out and "Exception ignored" not in out, out


def test_a_second_ctrl_c_aborts_without_a_traceback(make_config, capsys):
    class PressCtrlCTwice:
        def on_update(self, report, state):
            if report["update"] == 3:
                os.kill(os.getpid(), signal.SIGINT)  # the handler runs before the next line
                os.kill(os.getpid(), signal.SIGINT)

    config = make_config(iters=10)
    # Python's own handler, or SIG_IGN where the tests were started in the background
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(TrainingInterrupted) as aborted:
        train_run(config, progress=False, log=lambda _: None, callbacks=(PressCtrlCTwice(),))
    run_dir = Path(config.output.dir) / "run"
    # update 3 is checkpointed (save_every 3) before the callback presses Ctrl-C
    assert str(aborted.value) == f"aborted during update 4; continue from the last checkpoint with: " \
                                 f"{resume_command(run_dir)}"
    assert "stopping after this update, saving a checkpoint (press again to abort)" in capsys.readouterr().err
    assert json.loads((run_dir / "run.json").read_text())["status"] == "interrupted"
    assert signal.getsignal(signal.SIGINT) is before


def test_resuming_a_finished_run_says_it_is_finished(trained_run):
    with pytest.raises(UserError, match=r"this run already finished \(succeeded at update 8\); there is nothing "
                                        "to resume"):
        resume_run(trained_run, progress=False, log=lambda _: None)


def test_progress_without_a_terminal_is_a_line_every_5_percent(make_config, capsys):
    run = train_run(make_config(iters=40, eval_every=20), log=lambda _: None)  # pytest's stderr is no terminal
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    assert lines[0].startswith("loading ") and lines[1].startswith("loading ") and lines[1].endswith(" s")
    assert lines[2] == "training 40 optimizer updates"
    updates = [int(line.split()[1].split("/")[0]) for line in lines if line.startswith("update ") and "/40:" in line]
    assert updates == [1, *range(2, 41, 2)]
    assert sum("validation loss" in line for line in lines) == 2
    # The time left is the one the server's jobs show: the training loop's own estimate, at this
    # session's pace (the elapsed time over the updates so far, times the updates left).
    etas = {r["update"]: r["eta_seconds"] for r in RunDir(run.run_dir).metric_rows() if "loss" in r}
    seconds = [r["seconds"] for r in RunDir(run.run_dir).metric_rows() if "loss" in r]
    assert etas[40] == 0 and etas[10] == pytest.approx(sum(seconds[:10]) / 10 * 30)
    for line in lines:
        if line.startswith("update ") and "/40:" in line:
            assert line.endswith(f", {tqdm.format_interval(etas[int(line.split()[1].split('/')[0])])} left"), line


def test_adamw_updates_as_pytorchs_adamw_with_the_schedule_of_the_config():
    """README: AdamW with decoupled weight decay and bias correction, as PyTorch's, so learning
    rates carry over; here with warmup and the cosine decay over a few updates."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    start = rng.normal(size=(4, 3)).astype(np.float32)
    grads = [rng.normal(size=(4, 3)).astype(np.float32) for _ in range(5)]
    schedule = learning_rate_schedule(1e-2, 1e-3, warmup=2, total=5, kind="cosine")

    optimizer = make_optimizer(schedule, 0.1)
    params = {"w": mx.array(start)}
    optimizer.init(params)
    for g in grads:
        params = optimizer.apply_gradients({"w": mx.array(g)}, params)

    weight = torch.nn.Parameter(torch.from_numpy(start.copy()))
    reference = torch.optim.AdamW([weight], lr=1.0, weight_decay=0.1)
    for step, g in enumerate(grads):
        reference.param_groups[0]["lr"] = schedule(mx.array(step)).item()
        weight.grad = torch.from_numpy(g)
        reference.step()
    np.testing.assert_allclose(np.array(params["w"]), weight.detach().numpy(), rtol=1e-5, atol=1e-6)
    assert np.abs(np.array(params["w"]) - start).max() > 1e-3


def test_every_seed_the_config_accepts_trains(make_config):
    """training.seed takes any 64-bit value; each micro-batch's dropout key is derived from it."""
    result = train_run(make_config(iters=2, seed=2 ** 64 - 1), progress=False, log=lambda _: None)
    assert result.status == "succeeded" and math.isfinite(result.final_loss)


def test_a_run_named_after_any_config_file_gets_a_plain_name(make_config):
    """Without output.name a run is named after its config file and start time; a file name with
    spaces, or longer than a run name may be, still gives a name the registry and the server take."""
    config = make_config(iters=1)
    config.output.name = None
    result = train_run(config, config_name="my config " + "x" * 300, progress=False, log=lambda _: None)
    name = result.run_dir.name
    assert result.status == "succeeded" and is_plain_name(name) and name.startswith("my_config_xxx"), name
    assert [e.name for e in list_adapters(config.output.dir)] == [name]
