"""The main job end to end, as a newcomer runs it (with a shorter schedule)."""

import json
import subprocess
import sys


def test_quickstart_end_to_end(tmp_path):
    result = subprocess.run([sys.executable, "-m", "mlx_surgical", "quickstart", "--epochs", "1", "--no-progress",
                             "--out", str(tmp_path / "adapters"), "--model-dir", str(tmp_path / "models" / "tiny")],
                            capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "building a tiny random Llama model" in out
    assert "held-out prompt:" in out and "base model:" in out and "base + adapter:" in out
    assert "mlx_lm.generate --model" in out and "mlx-surgical export" in out
    (run_dir,) = (tmp_path / "adapters").iterdir()
    for name in ("adapters.safetensors", "adapter_config.json", "metrics.jsonl", "loss.png", "run.json"):
        assert (run_dir / name).exists(), name
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "succeeded" and info["data"]["train_examples"] == 104
    losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert sum(losses[-5:]) / 5 < losses[0]  # it learns, even in one epoch
