"""The run directory's files, written atomically, and exact resume.

A checkpoint is a directory `checkpoints/update-NNNNNNN/` holding the adapter, the
optimizer state (AdamW moments and step) and the loop position (dropout keys derive from
the position, see train.dropout_seed). It is
assembled under a temporary name and renamed into place, so a crash or SIGKILL at any
moment leaves only complete checkpoints behind. Loading the newest one restores
everything the loop needs to continue as if it had never stopped.
"""

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from .errors import UserError
from .surgery import ADAPTER_CONFIG, ADAPTER_FILE

RUN_CONFIG = "run_config.json"  # the resolved config the run was started with
RUN_INFO = "run.json"  # provenance, status and timings
METRICS = "metrics.jsonl"
LOSS_PLOT = "loss.png"
BEST_DIR = "best"
CHECKPOINTS_DIR = "checkpoints"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"


@dataclass
class TrainState:
    """Where the loop is, counted at the last completed optimizer update."""

    update: int = 0  # optimizer updates done
    position: int = 0  # micro-batches consumed
    tokens: int = 0  # tokens trained on
    best_val_loss: Optional[float] = None
    best_update: Optional[int] = None
    evals_since_best: int = 0
    train_seconds: float = 0.0


def _temp_path(path: Path, suffix: str = "") -> Path:
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    return Path(name)


def write_text_atomic(path: str | Path, text: str) -> None:
    path = Path(path)
    tmp = _temp_path(path)
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_jsonl(path: str | Path) -> list[dict]:
    """The rows of a JSON-lines file (metrics, job events); [] when it does not exist yet."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_json_atomic(path: str | Path, data) -> None:
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def save_safetensors_atomic(path: str | Path, arrays: dict, metadata: Optional[dict] = None) -> None:
    path = Path(path)
    tmp = _temp_path(path, ".safetensors")  # mx.save_safetensors wants the suffix
    try:
        mx.save_safetensors(str(tmp), arrays, metadata=metadata or {})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_adapter(directory: str | Path, weights: dict, config: dict) -> None:
    """adapters.safetensors + adapter_config.json, each replaced atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_safetensors_atomic(directory / ADAPTER_FILE, weights)
    write_json_atomic(directory / ADAPTER_CONFIG, config)


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("update-"))


def save_checkpoint(run_dir: str | Path, model, optimizer, state: TrainState, adapter_config: dict,
                    keep: int) -> Path:
    root = Path(run_dir) / CHECKPOINTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"update-{state.update:07d}"
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        write_adapter(staging, dict(tree_flatten(model.trainable_parameters())), adapter_config)
        mx.save_safetensors(str(staging / OPTIMIZER_FILE), dict(tree_flatten(optimizer.state)))
        (staging / STATE_FILE).write_text(json.dumps(asdict(state), indent=2) + "\n")
        if final.exists():  # the same update saved again (e.g. Ctrl-C right after a save)
            shutil.rmtree(final)
        os.rename(staging, final)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    for old in checkpoint_dirs(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: str | Path) -> Optional[Path]:
    found = checkpoint_dirs(run_dir)
    return found[-1] if found else None


def load_checkpoint(checkpoint: Path, model, optimizer) -> TrainState:
    """Restore adapter weights and optimizer state in place; returns the loop state."""
    try:
        model.load_weights(str(checkpoint / ADAPTER_FILE), strict=False)
        arrays = mx.load(str(checkpoint / OPTIMIZER_FILE))
        state = TrainState(**json.loads((checkpoint / STATE_FILE).read_text()))
    except (OSError, ValueError, TypeError) as e:
        raise UserError(f"{checkpoint}: checkpoint cannot be read ({e}); delete it to resume from the one before") from None
    optimizer.state = tree_unflatten(list(arrays.items()))
    return state
