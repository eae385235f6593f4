"""Checkpoints for exact resume, and the proof that one is sound before it is used.

A checkpoint is a directory `checkpoints/update-NNNNNNN/` holding the adapter, the optimizer
state (AdamW moments and step) and the loop position in state.json (dropout keys derive from
the position, see train.dropout_seed). It is assembled under a temporary name, flushed to disk
and renamed into place, so a crash at any moment leaves only complete checkpoints behind.

Only finite weights and moments are ever saved. state.json also records the size and sha256 of
the other files; loading checks those, then that the tensors are exactly the ones the model
and optimizer have (names and shapes) and finite, and that the loop state is sane. A
checkpoint failing any check is set aside with a one-line reason and the next older one is
used; the loop then continues from it as if it had never stopped.
"""

import json
import math
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Optional

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from .adapter import AdapterConfig, write_adapter
from .errors import TrainingDiverged, UserError
from .files import sha256_file, staged_directory, write_json_atomic
from .rundir import ADAPTER_CONFIG, ADAPTER_FILE, OPTIMIZER_FILE, STATE_FILE, RunDir

CHECKSUMMED_FILES = (ADAPTER_FILE, ADAPTER_CONFIG, OPTIMIZER_FILE)
REJECTED_SUFFIX = ".rejected"  # a checkpoint that failed its checks, kept for inspection


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


class CheckpointRejected(Exception):
    """One line saying why a checkpoint cannot be used."""


def non_finite(arrays: dict) -> list[str]:
    """Names of the floating-point arrays holding NaN or infinity."""
    names = [k for k, v in arrays.items() if mx.issubdtype(v.dtype, mx.floating)]
    flags = [mx.all(mx.isfinite(arrays[k])) for k in names]
    mx.eval(flags)
    return [k for k, ok in zip(names, flags) if not ok.item()]


def _describe(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def save_checkpoint(run_dir: str | Path, model, optimizer, state: TrainState, adapter_config: AdapterConfig,
                    keep: int) -> Path:
    run = RunDir(Path(run_dir))
    weights = dict(tree_flatten(model.trainable_parameters()))
    moments = dict(tree_flatten(optimizer.state))
    bad = non_finite({**weights, **moments})
    if bad:
        raise TrainingDiverged(f"training: {_describe(bad)} became NaN or infinite by update {state.update}")
    final = run.checkpoint(state.update)
    with staged_directory(final) as staging:  # the same update saved twice (Ctrl-C right after a save) replaces it
        write_adapter(staging, weights, adapter_config)
        save_file({k: np.asarray(v) for k, v in moments.items()}, str(staging / OPTIMIZER_FILE))
        files = {name: {"size": (staging / name).stat().st_size, "sha256": sha256_file(staging / name)}
                 for name in CHECKSUMMED_FILES}
        write_json_atomic(staging / STATE_FILE, {**asdict(state), "files": files})
    for old in run.checkpoint_dirs()[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: str | Path) -> Optional[Path]:
    found = RunDir(Path(run_dir)).checkpoint_dirs()
    return found[-1] if found else None


def checkpoint_update(checkpoint: Path) -> int:
    return int(checkpoint.name.rsplit("-", 1)[1])


@dataclass
class VerifiedCheckpoint:
    weights: dict
    moments: dict
    state: TrainState


def _state_from(raw, update: int) -> TrainState:
    """The loop state, checked field by field: a wrong type or an impossible value rejects it."""
    if not isinstance(raw, dict):
        raise CheckpointRejected(f"{STATE_FILE} is not a JSON object")
    names = {f.name for f in fields(TrainState)}
    if set(raw) != names:
        missing, unknown = sorted(names - set(raw)), sorted(set(raw) - names)
        raise CheckpointRejected(f"{STATE_FILE} has missing {missing} / unknown {unknown} fields")

    def count(name, low=0):
        value = raw[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise CheckpointRejected(f"{STATE_FILE}: {name} is {json.dumps(value)}, not a whole number >= {low}")
        return value

    def number(name, optional=False):
        value = raw[name]
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise CheckpointRejected(f"{STATE_FILE}: {name} is {json.dumps(value)}, not a finite number >= 0")
        return float(value)

    state = TrainState(update=count("update"), position=count("position"), tokens=count("tokens"),
                       best_val_loss=number("best_val_loss", optional=True),
                       best_update=None if raw["best_update"] is None else count("best_update"),
                       evals_since_best=count("evals_since_best"), train_seconds=number("train_seconds"))
    if state.update != update:
        raise CheckpointRejected(f"{STATE_FILE} says update {state.update}, its folder says {update}")
    if state.position < state.update:
        raise CheckpointRejected(f"{STATE_FILE}: position {state.position} is behind update {state.update}")
    if state.best_update is not None and state.best_update > state.update:
        raise CheckpointRejected(f"{STATE_FILE}: best_update {state.best_update} is after update {state.update}")
    return state


def _tensors(path: Path, expected: dict[str, tuple]) -> dict:
    """The arrays in a safetensors file, which must be exactly `expected` (name -> shape), finite."""
    try:
        arrays = load_file(str(path))
    except (SafetensorError, OSError, ValueError, TypeError) as e:
        raise CheckpointRejected(f"{path.name} cannot be read ({e})") from None
    missing, unknown = sorted(expected.keys() - arrays.keys()), sorted(arrays.keys() - expected.keys())
    if missing or unknown:
        raise CheckpointRejected(f"{path.name} does not match the model: missing {_describe(missing) or 'none'}, "
                                 f"unexpected {_describe(unknown) or 'none'}")
    for name, array in arrays.items():
        if tuple(array.shape) != tuple(expected[name]):
            raise CheckpointRejected(f"{path.name}: {name} has shape {tuple(array.shape)}, "
                                     f"the model needs {tuple(expected[name])}")
    bad = [k for k, v in arrays.items() if np.issubdtype(v.dtype, np.floating) and not np.isfinite(v).all()]
    if bad:
        raise CheckpointRejected(f"{path.name}: {_describe(bad)} hold NaN or infinite values")
    return {k: mx.array(v) for k, v in arrays.items()}


def verify_checkpoint(checkpoint: Path, model, optimizer) -> VerifiedCheckpoint:
    """Read and check a checkpoint against this model and optimizer without changing either."""
    try:
        raw = json.loads((checkpoint / STATE_FILE).read_text())
    except FileNotFoundError:
        raise CheckpointRejected(f"{STATE_FILE} is missing") from None
    except (OSError, ValueError, RecursionError) as e:
        raise CheckpointRejected(f"{STATE_FILE} cannot be read ({type(e).__name__})") from None
    # Checkpoints written before mlx_surgical recorded checksums have no "files"; the checks below still apply.
    files = raw.pop("files", None) if isinstance(raw, dict) else None
    if files is not None:
        if not isinstance(files, dict) or set(files) != set(CHECKSUMMED_FILES):
            raise CheckpointRejected(f"{STATE_FILE}: the list of checksummed files is damaged")
        for name, record in files.items():
            path = checkpoint / name
            if not path.is_file():
                raise CheckpointRejected(f"{name} is missing")
            if not isinstance(record, dict) or path.stat().st_size != record.get("size"):
                raise CheckpointRejected(f"{name} is {path.stat().st_size} bytes, "
                                         f"{record.get('size') if isinstance(record, dict) else '?'} were written")
            if sha256_file(path) != record.get("sha256"):
                raise CheckpointRejected(f"{name} does not match the checksum written with it")
    state = _state_from(raw, checkpoint_update(checkpoint))
    for name in (ADAPTER_FILE, OPTIMIZER_FILE):
        if not (checkpoint / name).is_file():
            raise CheckpointRejected(f"{name} is missing")
    weights = _tensors(checkpoint / ADAPTER_FILE,
                       {k: v.shape for k, v in tree_flatten(model.trainable_parameters())})
    moments = _tensors(checkpoint / OPTIMIZER_FILE, {k: v.shape for k, v in tree_flatten(optimizer.state)})
    if "step" in moments and int(moments["step"].item()) != state.update:
        raise CheckpointRejected(f"{OPTIMIZER_FILE}: the optimizer counted {int(moments['step'].item())} updates, "
                                 f"{STATE_FILE} {state.update}")
    return VerifiedCheckpoint(weights, moments, state)


def load_checkpoint(run_dir: str | Path, model, optimizer, warn: Callable[[str], None],
                    set_aside: bool = True) -> Optional[TrainState]:
    """Restore the newest sound checkpoint of a run into `model` and `optimizer`, in place.
    Newer checkpoints that fail a check are reported through `warn` and (with set_aside) renamed
    so they are not tried again. None when the run has no checkpoint; UserError when none of
    them is usable."""
    found = RunDir(Path(run_dir)).checkpoint_dirs()
    if not found:
        return None
    rejected = []
    for checkpoint in reversed(found):
        try:
            verified = verify_checkpoint(checkpoint, model, optimizer)
        except CheckpointRejected as e:
            rejected.append((checkpoint, str(e)))
            continue
        # The names and shapes were checked above; strict=True would also demand the frozen base weights.
        model.load_weights(list(verified.weights.items()), strict=False)
        optimizer.state = tree_unflatten(list(verified.moments.items()))
        for bad, reason in rejected:
            warn(f"warning: checkpoint {bad.name} is unusable ({reason}); resuming from {checkpoint.name} instead")
            if set_aside:
                aside = bad.with_name(bad.name + REJECTED_SUFFIX)
                if aside.exists():
                    shutil.rmtree(aside)
                bad.rename(aside)
        return verified.state
    checkpoints = RunDir(Path(run_dir)).checkpoints
    raise UserError(*(f"{bad}: unusable checkpoint: {reason}" for bad, reason in rejected),
                    f"{run_dir}: no usable checkpoint to resume from; to start the run again from the "
                    f"beginning, move {checkpoints} aside and resume")
