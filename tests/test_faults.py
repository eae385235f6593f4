"""Fault injection: damaged checkpoints, kills at bad moments, two writers, a swapped base model,
NaN at every stage. Each fault must end in a clear message and a run that can go on."""

import json
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file, save_file

from mlx_surgical.adapter import AdapterConfig
from mlx_surgical.cli import cli
from mlx_surgical.config import save_config
from mlx_surgical.errors import Conflict, TrainingDiverged, TrainingInterrupted, UserError
from mlx_surgical.export import export_adapter
from mlx_surgical.files import sha256_file
from mlx_surgical.pipeline import StopFlag, resume_run, train_run
from mlx_surgical.registry import verify
from mlx_surgical.rundir import RunDir, RunInfo

QUIET = {"progress": False, "log": lambda _: None}


class StopAt:
    """A callback that asks the run to stop after a given update, as Ctrl-C would."""

    def __init__(self, flag: StopFlag, update: int):
        self.flag, self.update = flag, update

    def on_update(self, report, state):
        if state.update >= self.update:
            self.flag.requested = True


def interrupt(config, at: int) -> Path:
    flag = StopFlag()
    with pytest.raises(TrainingInterrupted):
        train_run(config, stop_flag=flag, callbacks=(StopAt(flag, at),), **QUIET)
    return Path(config.output.dir) / config.output.name


def adapter_of(run_dir: Path) -> dict:
    return load_file(str(run_dir / "adapters.safetensors"))


def assert_same_adapter(a: Path, b: Path):
    x, y = adapter_of(a), adapter_of(b)
    assert x.keys() == y.keys()
    for name in x:
        np.testing.assert_allclose(x[name], y[name], atol=1e-5)


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory):
    """A straight 8-update run, and the same run stopped after update 7 with checkpoints at 3, 6 and 7."""
    from conftest import short_config

    root = tmp_path_factory.mktemp("fault-runs")
    straight = short_config(tiny_model, root, iters=8, keep_checkpoints=3)
    straight.output.name = "straight"
    train_run(straight, **QUIET)
    cut = short_config(tiny_model, root, iters=8, keep_checkpoints=3)
    cut.output.name = "cut"
    cut_dir = interrupt(cut, at=7)
    assert [p.name for p in RunDir(cut_dir).checkpoint_dirs()] == [f"update-000000{i}" for i in (3, 6, 7)]
    return root / "straight", cut_dir


@pytest.fixture
def cut_copy(runs, tmp_path):
    run_dir = tmp_path / "adapters" / "cut"
    shutil.copytree(runs[1], run_dir)
    return run_dir


def rewrite_checksums(checkpoint: Path):
    """Make the recorded sizes and checksums match tampered files, so the deeper checks are what fails."""
    state = json.loads((checkpoint / "state.json").read_text())
    for name in state["files"]:
        state["files"][name] = {"size": (checkpoint / name).stat().st_size, "sha256": sha256_file(checkpoint / name)}
    (checkpoint / "state.json").write_text(json.dumps(state))


def truncate(path: Path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_bytes(path: Path):
    data = bytearray(path.read_bytes())
    for i in range(len(data) - 64, len(data) - 8, 4):
        data[i] ^= 0x7F
    path.write_bytes(bytes(data))


def drop_half_the_tensors(path: Path):
    tensors = load_file(str(path))
    save_file(dict(sorted(tensors.items())[: len(tensors) // 2]), str(path), metadata={"format": "mlx"})
    rewrite_checksums(path.parent)


def nan_in_moments(path: Path):
    tensors = load_file(str(path))
    name = next(k for k in sorted(tensors) if k.endswith(".v"))
    tensors[name][...] = np.nan
    save_file(tensors, str(path))
    rewrite_checksums(path.parent)


def set_state(**values):
    def damage(path: Path):
        state = json.loads(path.read_text())
        state.update(values)
        path.write_text(json.dumps(state))
    return damage


DAMAGE = {
    "truncated adapter": ("adapters.safetensors", truncate, "adapters.safetensors is"),
    "empty optimizer": ("optimizer.safetensors", lambda p: p.write_bytes(b""), "optimizer.safetensors is 0 bytes"),
    "missing optimizer": ("optimizer.safetensors", Path.unlink, "optimizer.safetensors is missing"),
    "missing state": ("state.json", Path.unlink, "state.json is missing"),
    "torn state": ("state.json", truncate, "state.json cannot be read"),
    "flipped bytes": ("optimizer.safetensors", flip_bytes, "does not match the checksum"),
    "half the tensors": ("adapters.safetensors", drop_half_the_tensors, "does not match the model: missing"),
    "NaN moments": ("optimizer.safetensors", nan_in_moments, "hold NaN or infinite values"),
    "update not a number": ("state.json", set_state(update="abc"), 'update is "abc"'),
    "negative position": ("state.json", set_state(position=-5), "position is -5"),
}


@pytest.mark.parametrize("case", DAMAGE)
def test_a_damaged_newest_checkpoint_is_set_aside_and_the_one_before_used(runs, cut_copy, case):
    name, damage, reason = DAMAGE[case]
    damage(cut_copy / "checkpoints" / "update-0000007" / name)
    lines = []
    result = resume_run(cut_copy, progress=False, log=lines.append)
    warning = next(line for line in lines if line.startswith("warning:"))
    assert "update-0000007 is unusable" in warning and reason in warning and "from update-0000006" in warning
    assert any("resuming" in line and "from update 6 of 8" in line for line in lines)
    assert result.status == "succeeded" and result.updates == 8
    assert_same_adapter(runs[0], cut_copy)  # continued exactly from update 6
    assert (cut_copy / "checkpoints" / "update-0000007.rejected").is_dir()
    rows = RunDir(cut_copy).metric_rows()
    assert [r["update"] for r in rows if "loss" in r] == list(range(1, 9))


def test_no_usable_checkpoint_is_one_clear_error_per_checkpoint(cut_copy):
    for checkpoint in RunDir(cut_copy).checkpoint_dirs():
        (checkpoint / "optimizer.safetensors").write_bytes(b"garbage")
    with pytest.raises(UserError) as refused:
        resume_run(cut_copy, **QUIET)
    lines = refused.value.problems
    assert len(lines) == 4 and all("unusable checkpoint: optimizer.safetensors is 7 bytes" in p for p in lines[:3])
    assert "no usable checkpoint" in lines[3] and "move" in lines[3]
    assert len(RunDir(cut_copy).checkpoint_dirs()) == 3  # nothing is set aside when nothing can be used


def test_a_torn_last_metrics_line_and_staging_leftovers_are_cleaned_up(runs, cut_copy):
    with (cut_copy / "metrics.jsonl").open("a") as f:
        f.write('{"update": 8, "lo')
    leftovers = [cut_copy / ".adapters.safetensors.x1y2.tmp", cut_copy / "checkpoints" / ".update-0000008.ab12.tmp"]
    leftovers[0].write_bytes(b"half")
    leftovers[1].mkdir()
    assert [r["update"] for r in RunDir(cut_copy).metric_rows() if "loss" in r] == list(range(1, 8))
    resume_run(cut_copy, **QUIET)
    assert not any(p.exists() for p in leftovers)
    assert [r["update"] for r in RunDir(cut_copy).metric_rows() if "loss" in r] == list(range(1, 9))
    assert_same_adapter(runs[0], cut_copy)


def test_resume_refuses_a_swapped_base_model(tiny_model, other_tiny_model, make_config, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    config = make_config(iters=8)
    config.model.path = str(model)
    run_dir = interrupt(config, at=4)
    shutil.rmtree(model)
    shutil.copytree(other_tiny_model, model)  # same path, another model (3 layers, hidden 128)
    fingerprint = AdapterConfig.read(run_dir).base.fingerprint
    with pytest.raises(UserError, match="resume needs the same base model") as refused:
        resume_run(run_dir, **QUIET)
    assert "llama 2 layers x hidden 64" in str(refused.value) and "llama 3 layers x hidden 128" in str(refused.value)
    assert AdapterConfig.read(run_dir).base.fingerprint == fingerprint


KILLED_INSIDE_CHECKPOINT = textwrap.dedent("""
    import os, signal, sys
    import mlx_surgical.checkpoint as checkpoint
    from mlx_surgical.cli import cli

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    if sys.argv[2] == "before-rename":
        rename = os.rename
        def renaming(src, dst):
            if os.path.basename(str(dst)) == "update-0000003":
                die()
            return rename(src, dst)
        os.rename = renaming
    else:  # half-way through writing the optimizer state
        save = checkpoint.save_file
        def saving(tensors, path, **kwargs):
            save(tensors, path, **kwargs)
            os.truncate(path, os.path.getsize(path) // 2)
            die()
        checkpoint.save_file = saving
    cli(["train", "--no-progress", sys.argv[1]])
""")


@pytest.mark.parametrize("moment, again", [("before-rename", "resume"), ("writing-optimizer", "config")])
def test_killed_inside_the_first_checkpoint_starts_again_cleanly(runs, tiny_model, tmp_path, moment, again):
    from conftest import short_config

    config = short_config(tiny_model, tmp_path / "adapters", iters=8, keep_checkpoints=3)
    path = tmp_path / "run.json"
    save_config(config, path)
    killed = subprocess.run([sys.executable, "-c", KILLED_INSIDE_CHECKPOINT, str(path), moment],
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    run = RunDir(Path(config.output.dir) / "run")
    assert run.checkpoint_dirs() == [] and RunInfo.load(run.path).status == "running"
    assert [p.name for p in run.checkpoints.iterdir() if p.name.startswith(".update-0000003")]  # the half checkpoint

    args = ["train", "--no-progress"] + (["--resume", str(run.path)] if again == "resume" else [str(path)])
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "has no checkpoint" in result.output and "starting it from the beginning" in result.output
    assert sorted(p.name for p in run.checkpoints.iterdir()) == [f"update-000000{i}" for i in (3, 6)]
    assert [r["update"] for r in run.metric_rows() if "loss" in r] == list(range(1, 9))
    assert_same_adapter(runs[0], run.path)


def test_a_second_writer_is_refused_with_the_holders_pid_and_a_dead_ones_lock_is_taken_over(make_config, tmp_path):
    config = make_config(iters=30, save_every=2)
    path = tmp_path / "run.json"
    save_config(config, path)
    run = RunDir(Path(config.output.dir) / "run")
    first = subprocess.Popen([sys.executable, "-m", "mlx_surgical", "train", "--no-progress", str(path)],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while not run.checkpoint_dirs():
            assert first.poll() is None and time.time() < deadline, first.stdout.read()
            time.sleep(0.05)
        for args in (["train", str(path)], ["train", "--resume", str(run.path)]):
            second = CliRunner().invoke(cli, args)
            assert second.exit_code == 2
            assert f"is in use by another process (pid {first.pid} on " in second.output, second.output
    finally:
        first.kill()
        first.wait()
    taken_over = CliRunner().invoke(cli, ["train", "--no-progress", "--resume", str(run.path)])
    assert taken_over.exit_code == 0, taken_over.output
    assert "resuming" in taken_over.output and RunInfo.load(run.path).status == "succeeded"
    assert not run.lock.exists()  # a run that ended keeps no lock file
    with pytest.raises(Conflict, match="already exists"):  # a finished run is never started over
        train_run(config, **QUIET)


def test_weights_that_stop_being_finite_before_any_checkpoint_fail_truthfully_and_the_run_starts_again(make_config):
    config = make_config(iters=4, learning_rate=1e300)  # the float32 learning rate overflows to inf
    with pytest.raises(TrainingDiverged) as diverged:
        train_run(config, **QUIET)
    message = str(diverged.value)
    assert "weights became NaN or infinite at update 1" in message and "No checkpoint was written" in message
    run = RunDir(Path(config.output.dir) / "run")
    info = RunInfo.load(run.path)
    assert info.status == "failed" and info.error == message and not run.checkpoint_dirs()
    config.training.learning_rate = 1e-2
    assert train_run(config, **QUIET).status == "succeeded"  # no dead end: the same name starts again


def test_divergence_after_a_checkpoint_keeps_it_and_a_lower_learning_rate_continues(runs, cut_copy):
    before = {p.name: sha256_file(p) for p in (cut_copy / "checkpoints" / "update-0000007").iterdir()}
    diverged = CliRunner().invoke(cli, ["train", "--no-progress", "--resume", str(cut_copy), "--learning-rate", "1e300"])
    assert diverged.exit_code == 2
    [line] = [line for line in diverged.output.splitlines() if line.startswith("error:")]
    assert "at update 8" in line and "update-0000007, holds finite weights and is kept" in line
    assert f"--resume {cut_copy} --learning-rate 1e+299" in line
    assert {p.name: sha256_file(p) for p in (cut_copy / "checkpoints" / "update-0000007").iterdir()} == before
    assert verify(cut_copy.parent, "cut")[-1].startswith("shapes fit")  # the top-level adapter is the finite one

    for bad in ("nan", "0", "-1e-3"):
        refused = CliRunner().invoke(cli, ["train", "--resume", str(cut_copy), "--learning-rate", bad])
        assert refused.exit_code == 2 and "error: --learning-rate: give a positive number" in refused.output
    continued = CliRunner().invoke(cli, ["train", "--no-progress", "--resume", str(cut_copy), "--learning-rate", "5e-3"])
    assert continued.exit_code == 0, continued.output
    changes = RunInfo.load(cut_copy).learning_rate_changes
    assert [(c["update"], c["learning_rate"], c["previous"]) for c in changes] == [(7, 1e300, 1e-2), (7, 5e-3, 1e300)]
    # The schedule keeps its shape at the new peak: update 8 runs at half the straight run's rate.
    rate = {r["update"]: r["learning_rate"] for r in RunDir(cut_copy).metric_rows() if "loss" in r}
    straight = {r["update"]: r["learning_rate"] for r in RunDir(runs[0]).metric_rows() if "loss" in r}
    assert rate[7] == straight[7] and rate[8] == pytest.approx(straight[8] / 2)


def test_non_finite_state_is_never_saved_nor_exported(make_config, trained_run, tmp_path):
    from mlx.utils import tree_flatten

    import mlx.core as mx
    from mlx_surgical.adapter import AdapterConfig, PromptRecord
    from mlx_surgical.callbacks import Checkpointer
    from mlx_surgical.checkpoint import TrainState
    from mlx_surgical.config import LoraConfig
    from mlx_surgical.model import load_model
    from mlx_surgical.surgery import attach_lora
    from mlx_surgical.train import make_optimizer

    config = make_config()
    loaded = load_model(config.model.path)
    attach_lora(loaded.model, LoraConfig(), seed=0)
    optimizer = make_optimizer(1e-3, 0.0)
    optimizer.init(loaded.model.trainable_parameters())
    name, value = tree_flatten(loaded.model.trainable_parameters())[0]
    loaded.model.load_weights([(name, mx.full(value.shape, float("inf")))], strict=False)
    adapter_config = AdapterConfig.for_run(LoraConfig(), loaded.shape, config.model.path, config.model.path,
                                           PromptRecord())
    with pytest.raises(TrainingDiverged, match=f"{name} became NaN or infinite by update 3"):
        Checkpointer(tmp_path / "run", loaded.model, optimizer, adapter_config, 3, 2).save(TrainState(update=3))
    assert not (tmp_path / "run" / "checkpoints").exists()

    damaged = tmp_path / "adapters" / "damaged"
    shutil.copytree(trained_run, damaged)
    tensors = load_file(str(damaged / "adapters.safetensors"))
    tensors[sorted(tensors)[0]][0, 0] = np.nan
    save_file(tensors, str(damaged / "adapters.safetensors"), metadata={"format": "mlx"})
    with pytest.raises(UserError, match="hold NaN or infinite values"):
        verify(tmp_path / "adapters", "damaged")
    for fmt in ("mlx", "peft", "gguf", "fused"):
        with pytest.raises(UserError, match="hold NaN or infinite values"):
            export_adapter(damaged, fmt, tmp_path / f"out-{fmt}")
        assert not (tmp_path / f"out-{fmt}").exists()


# The server: one scheduler per workspace, one job per name, one worker per job.

def test_parallel_posts_with_one_name_get_exactly_one_202(start_server, tiny_model):
    from concurrent.futures import ThreadPoolExecutor

    from test_server import job_config

    server = start_server()
    with server.client() as client, ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: client.post("/api/training/start", json=job_config(tiny_model, "same", iters=2)),
                                range(4)))
    assert sorted(a.status_code for a in answers) == [202, 409, 409, 409]
    assert all("already exists" in a.json()["problems"][0] for a in answers if a.status_code == 409)


def test_a_second_server_on_a_workspace_is_refused(start_server, tmp_path):
    from conftest import free_port

    first = start_server()
    second = subprocess.run([sys.executable, "-m", "mlx_surgical", "serve", "--port", str(free_port()),
                             "--workspace", str(tmp_path / "workspace")], capture_output=True, text=True, timeout=60)
    assert second.returncode == 2
    assert f"is in use by another process (pid {first.process.pid} on " in second.stderr, second.stderr


def test_stop_then_resume_at_once(start_server, tiny_model):
    from test_server import job_config, wait_for

    server = start_server()
    with server.client() as client:
        job_id = client.post("/api/training/start", json=job_config(tiny_model, "gapless", iters=40)).json()["id"]
        wait_for(client, job_id, lambda j: j["state"] == "running" and j["update"] >= 3)
        assert client.post(f"/api/training/jobs/{job_id}/stop").status_code == 200
        resumed = client.post(f"/api/training/jobs/{job_id}/resume")  # no gap: the worker is still stopping
        assert resumed.status_code == 202, resumed.text
        done = wait_for(client, job_id, lambda j: j["state"] in ("succeeded", "failed", "cancelled"))
        assert done["state"] == "succeeded" and done["update"] == 40, done
        updates = [m["update"] for m in client.get(f"/api/training/jobs/{job_id}/metrics").json() if "loss" in m]
        assert updates == list(range(1, 41))


def test_a_worker_that_lost_its_job_cannot_write_its_record(tiny_model, tmp_path):
    from mlx_surgical.config import config_from_dict
    from mlx_surgical.jobs import JobStore, StaleWorker

    from test_server import job_config

    store = JobStore(tmp_path / "workspace")
    config = config_from_dict(job_config(tiny_model, "fenced"))
    config.output.dir = str(store.adapters)
    job = store.create(config)
    with store.locked(job.id) as record:
        record.attempt, record.state = 1, "running"
    store.worker_write(job.id, 1, lambda j: setattr(j, "update", 3))
    with store.locked(job.id) as record:  # what a resume (or a restarted server) does
        record.attempt, record.state = 2, "queued"
    with pytest.raises(StaleWorker):
        store.worker_write(job.id, 1, lambda j: setattr(j, "state", "cancelled"), {"type": "end", "state": "cancelled"})
    assert store.get(job.id).state == "queued" and store.get(job.id).update == 3 and store.events(job.id) == []


def test_adapter_routes_see_the_workspace_only(start_server, trained_run, tmp_path):
    elsewhere = tmp_path / "server-cwd"
    shutil.copytree(trained_run, elsewhere / "outside")
    server = start_server(cwd=elsewhere)
    with server.client() as client:
        assert client.get("/api/adapters/outside").status_code == 404
        assert client.get("/api/adapters/outside/export", params={"format": "mlx"}).status_code == 404
        assert client.get("/api/adapters").json() == []
