"""The main job end to end, as a newcomer runs it (with a shorter schedule)."""

import json
import re
import signal
import subprocess
import sys
import time

import pytest

from mlx_surgical.console import resume_command


def quickstart(tmp_path, *extra, **popen):
    return subprocess.Popen([sys.executable, "-m", "mlx_surgical", "quickstart", "--epochs", "1", "--no-progress",
                             "--out", str(tmp_path / "adapters"), "--model-dir", str(tmp_path / "models" / "tiny"),
                             *extra], text=True, cwd=tmp_path, **popen)


def test_quickstart_end_to_end(tmp_path, pasted):
    proc = quickstart(tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, out + err
    assert "building a tiny random Llama model" in out
    assert "held-out prompt:" in out and "base model:" in out and "base + adapter:" in out
    lines = out.splitlines()
    for heading in ("base model:", "base + adapter:"):  # answers as text, not Python reprs
        answer = lines[lines.index(heading) + 1]
        assert answer.startswith("  ") and not answer.startswith(("  '", '  "')), answer
    (run_dir,) = (tmp_path / "adapters").iterdir()
    use = lines[lines.index("use it:") + 1:lines.index("use it:") + 4]
    assert [pasted(line)[:2] for line in use] == [["mlx-surgical", "generate"], ["mlx_lm.generate", "--model"],
                                                   ["mlx-surgical", "export"]]
    assert pasted(use[2]) == ["mlx-surgical", "export", str(run_dir), "--format", "peft"]
    assert lines[-1].startswith("the quickstart took ") and lines[-1].endswith(" s on this machine")
    assert "update 26/26:" in err and "\r" not in err  # plain progress lines
    for name in ("adapters.safetensors", "adapter_config.json", "metrics.jsonl", "loss.png", "run.json"):
        assert (run_dir / name).exists(), name
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "succeeded" and info["data"]["train_examples"] == 104
    losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert sum(losses[-5:]) / 5 < losses[0]  # it learns, even in one epoch


def test_ctrl_c_in_the_quickstart_saves_and_says_how_to_resume(tmp_path):
    proc = quickstart(tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while not list((tmp_path / "adapters").glob("*/metrics.jsonl")):
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() is not None else ""
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    (run_dir,) = (tmp_path / "adapters").iterdir()
    assert proc.returncode == 130, out
    assert "Traceback" not in out
    assert "stopping after this update, saving a checkpoint (press again to abort)" in out
    assert out.rstrip().endswith(f"checkpoint saved. Continue with: {resume_command(run_dir)}")
    assert json.loads((run_dir / "run.json").read_text())["status"] == "interrupted"


@pytest.mark.slow
def test_the_shipped_quickstart_keeps_the_readmes_promise(tmp_path):
    """The quickstart as a newcomer runs it, full schedule: the training loss at least halves and
    the adapted model answers in the trained form, while the random base does not."""
    proc = subprocess.run([sys.executable, "-m", "mlx_surgical", "quickstart", "--no-progress"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    first, recent = map(float, re.search(r"training loss ([\d.]+) at the first update -> ([\d.]+) over the last",
                                         proc.stdout).groups())
    assert recent <= first / 2, proc.stdout
    lines = proc.stdout.splitlines()
    assert lines[lines.index("base + adapter:") + 1] == "  Here is the function:"
    assert not lines[lines.index("base model:") + 1].startswith("  Here is")
