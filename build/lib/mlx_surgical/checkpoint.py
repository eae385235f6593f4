"""Checkpoints for exact resume.

A checkpoint is a directory `checkpoints/update-NNNNNNN/` holding the adapter, the
optimizer state (AdamW moments and step) and the loop position (dropout keys derive from
the position, see train.dropout_seed). It is
assembled under a temporary name and renamed into place, so a crash or SIGKILL at any
moment leaves only complete checkpoints behind. Loading the newest one restores
everything the loop needs to continue as if it had never stopped.
"""

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from .adapter import AdapterConfig, write_adapter
from .errors import UserError
from .files import staged_directory
from .rundir import ADAPTER_FILE, OPTIMIZER_FILE, STATE_FILE, RunDir


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


def save_checkpoint(run_dir: str | Path, model, optimizer, state: TrainState, adapter_config: AdapterConfig,
                    keep: int) -> Path:
    run = RunDir(Path(run_dir))
    final = run.checkpoint(state.update)
    with staged_directory(final) as staging:  # the same update saved twice (Ctrl-C right after a save) replaces it
        write_adapter(staging, dict(tree_flatten(model.trainable_parameters())), adapter_config)
        mx.save_safetensors(str(staging / OPTIMIZER_FILE), dict(tree_flatten(optimizer.state)))
        (staging / STATE_FILE).write_text(json.dumps(asdict(state), indent=2) + "\n")
    for old in run.checkpoint_dirs()[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: str | Path) -> Optional[Path]:
    found = RunDir(Path(run_dir)).checkpoint_dirs()
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
