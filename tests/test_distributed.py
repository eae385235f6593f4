"""Data-parallel training with MLX's own launcher: 2 ranks on loopback with the ring backend."""

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_surgical.config import save_config
from mlx_surgical.pipeline import train_run

LAUNCH = shutil.which("mlx.launch", path=str(Path(sys.executable).parent)) or shutil.which("mlx.launch")
pytestmark = pytest.mark.skipif(LAUNCH is None, reason="mlx.launch is not installed")


def launch(ranks: int, *args) -> subprocess.Popen:
    return subprocess.Popen([LAUNCH, "-n", str(ranks), "--backend", "ring", sys.executable, "-m", "mlx_surgical",
                             "train", "--no-progress", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def config_file(make_config, tmp_path, name, **training):
    config = make_config(batch_size=2, grad_accumulation_steps=2, **training)
    config.output.name = name
    path = tmp_path / f"{name}.json"
    save_config(config, path)
    return config, path, Path(config.output.dir) / name


def assert_same_adapter(a: Path, b: Path):
    left, right = mx.load(str(a / "adapters.safetensors")), mx.load(str(b / "adapters.safetensors"))
    assert left.keys() == right.keys()
    for name in left:
        np.testing.assert_allclose(np.array(left[name]), np.array(right[name]), atol=1e-5, err_msg=name)


def test_two_ranks_train_exactly_what_one_process_trains(make_config, tmp_path):
    single, _, single_dir = config_file(make_config, tmp_path, "one", iters=6)
    train_run(single, progress=False, log=lambda _: None)
    _, path, two_dir = config_file(make_config, tmp_path, "two", iters=6)
    proc = launch(2, str(path))
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    assert out.count("succeeded: 6 updates") == out.count("adapter: ") == 1, out  # only rank 0 reports
    assert_same_adapter(single_dir, two_dir)
    info = json.loads((two_dir / "run.json").read_text())
    assert info["ranks"] == 2 and info["status"] == "succeeded"
    rows = [json.loads(line) for line in (two_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert [r["update"] for r in rows] == list(range(1, 7))  # reported once, by rank 0
    single_rows = [json.loads(line) for line in (single_dir / "metrics.jsonl").read_text().splitlines()
                   if '"loss"' in line]
    np.testing.assert_allclose([r["loss"] for r in rows], [r["loss"] for r in single_rows], rtol=1e-5)
    assert rows[-1]["tokens"] == single_rows[-1]["tokens"]  # global token counts


def test_a_single_process_run_resumes_on_two_ranks(make_config, tmp_path):
    straight, _, straight_dir = config_file(make_config, tmp_path, "straight", iters=8, save_every=4)
    train_run(straight, progress=False, log=lambda _: None)
    _, path, cut_dir = config_file(make_config, tmp_path, "cut", iters=8, save_every=4)
    proc = subprocess.Popen([sys.executable, "-m", "mlx_surgical", "train", "--no-progress", str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not (cut_dir / "checkpoints" / "update-0000004").exists():
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() is not None else ""
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert json.loads((cut_dir / "run.json").read_text())["status"] == "running"
    resumed = launch(2, "--resume", str(cut_dir))
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out
    assert_same_adapter(straight_dir, cut_dir)


def test_a_global_batch_that_does_not_split_is_refused(make_config, tmp_path):
    _, path, run_dir = config_file(make_config, tmp_path, "odd", iters=2)
    raw = json.loads(path.read_text())
    raw["training"]["batch_size"] = 3
    path.write_text(json.dumps(raw))
    proc = launch(2, str(path))
    out, _ = proc.communicate(timeout=600)
    # mlx.launch (MLX 0.32) exits 0 even when its ranks fail, so read what the ranks said.
    assert out.count("error: training.batch_size: the global batch of 3 does not split evenly over 2 ranks") == 2
    assert "exited with code 2" in out
    assert not run_dir.exists()
