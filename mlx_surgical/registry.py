"""The adapters/ directory as a registry: list, show, verify and remove runs.

Every run directory explains itself (rundir.RunInfo, adapter.AdapterConfig), so the registry
keeps no index of its own: listing reads the directories. It never loads MLX."""

import os
import shutil
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePath
from typing import Optional

from .adapter import AdapterConfig, is_adapter_dir, read_adapter
from .config import OutputConfig
from .errors import Conflict, NotFound, UserError
from .files import not_a_file, read_json_or_empty, sha256_file
from .locks import is_locked
from .rundir import RunDir, RunInfo
from .shape import local_shape


@dataclass
class AdapterEntry:
    name: str
    path: str
    status: str
    base_model: str
    trainable_parameters: Optional[int]
    size_bytes: int
    best_val_loss: Optional[float]
    final_val_loss: Optional[float]
    created: str
    problems: list[str] = field(default_factory=list)  # why a run listed as "damaged" cannot be read

    def to_dict(self) -> dict:
        return asdict(self)


def entry(run_dir: Path) -> AdapterEntry:
    """One run as listed; a run whose records cannot be read is listed as damaged, saying why."""
    run = RunDir(run_dir)
    problems: list[str] = []
    try:
        info = RunInfo.load(run_dir)
    except UserError as e:
        info, problems = RunInfo(name=run.name, created=""), e.problems
    try:
        base_model = AdapterConfig.read(run_dir).base_model or "?"
    except UserError as e:
        base_model, problems = "?", problems + e.problems
    created = info.created or datetime.fromtimestamp(run.adapter.stat().st_mtime,
                                                     timezone.utc).isoformat(timespec="seconds")
    return AdapterEntry(
        name=run.name,
        path=str(run_dir),
        status="damaged" if problems else info.status if run.info.exists() else "exported",
        base_model=base_model,
        trainable_parameters=info.trainable_parameters,
        size_bytes=run.adapter.stat().st_size,
        best_val_loss=info.best.val_loss if info.best else None,
        final_val_loss=info.final.val_loss if info.final else None,
        created=created,
        problems=problems,
    )


def format_table(entries: list[AdapterEntry]) -> str:
    """The registry as `adapters list` prints it, one line per adapter."""
    row = "{:<32} {:<12} {:<28} {:>12} {:>9} {:>9} {:>9}  {}"
    loss = lambda v: f"{v:.4f}" if v is not None else "-"  # noqa: E731
    header = row.format("name", "status", "base model", "parameters", "size", "best val", "final val", "created")
    tail = lambda text, width: text if len(text) <= width else "..." + text[3 - width:]  # noqa: E731
    lines = [row.format(tail(e.name, 32), e.status, tail(e.base_model, 28), f"{e.trainable_parameters or 0:,}",
                        f"{e.size_bytes / 1e6:.2f}MB", loss(e.best_val_loss), loss(e.final_val_loss), e.created)
             for e in entries]
    return "\n".join([header, *lines, *(f"damaged: {problem}" for e in entries for problem in e.problems)])


def list_adapters(root: str | Path = OutputConfig.dir) -> list[AdapterEntry]:
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted((entry(p) for p in root.iterdir() if p.is_dir() and is_adapter_dir(p)), key=lambda e: e.created)


def find(root: str | Path, name: str, paths: bool = True) -> Path:
    """A run by name inside root, or (with paths) a path to an adapter directory anywhere."""
    for candidate in (Path(root) / name, *([Path(name)] if paths else [])):
        try:
            if candidate.is_dir() and is_adapter_dir(candidate):
                return candidate
        except OSError:  # a name longer than the file system allows (ENAMETOOLONG) names no adapter
            continue
    known = ", ".join(e.name for e in list_adapters(root)) or "none"
    raise NotFound(f"adapter '{name}' not found in {root} (known: {known})")


def show(root: str | Path, name: str, paths: bool = True) -> dict:
    run = RunDir(find(root, name, paths))
    shown = {**entry(run.path).to_dict(), "adapter_config": read_json_or_empty(run.adapter_config),
             "run": read_json_or_empty(run.info)}
    if run.eval_json.exists():
        shown["eval"] = read_json_or_empty(run.eval_json).get("summary")
    return shown


def verify(root: str | Path, name: str, model_path: Optional[str] = None) -> list[str]:
    """Check recorded checksums, that the tensors load, and that their shapes fit the base
    model (the recorded one, or `model_path`). Returns what was checked; raises UserError
    listing every failure."""
    run_dir = find(root, name)
    run = RunDir(run_dir)
    problems, checked = [], []
    try:
        recorded = RunInfo.load(run_dir).checksums
    except UserError as e:
        problems, recorded = e.problems, {}
    for file, expected in recorded.items():
        path = run_dir / file
        # never hash, nor probe, outside the run: not by the path, nor through a link inside it
        if PurePath(file).is_absolute() or ".." in PurePath(file).parts:
            problems.append(f"{run.info}: checksums: '{file}' is not a file inside the run directory; "
                            "delete that entry")
        elif not Path(os.path.realpath(path)).is_relative_to(os.path.realpath(run_dir)):  # realpath: loops too
            problems.append(f"{path}: a link leading outside the run directory; put the file itself there")
        elif not path.exists():
            problems.append(f"{path}: missing (listed in {run.info.name})")
        elif path.is_dir():
            problems += not_a_file(path).problems
        elif sha256_file(path) != expected:
            problems.append(f"{path}: checksum differs from the one recorded when the run finished")
        else:
            checked.append(f"{file}: checksum ok")
    if not recorded:
        checked.append("no checksums recorded (run unfinished or exported): checked tensors only")
    try:
        adapter = read_adapter(run_dir)
        checked.append(f"{run.adapter.name}: {len(adapter.pairs)} LoRA pairs load")
    except UserError as e:
        raise UserError(*problems, *e.problems) from None
    shape = local_shape(Path(model_path)) if model_path else adapter.config.base_shape()
    base = model_path or adapter.config.base_model
    if mismatch := adapter.config.base_mismatch(shape, base, run_dir):
        problems.append(mismatch)
    problems += adapter.fit_problems(shape, base)
    if problems:
        raise UserError(*problems)
    checked.append(f"shapes fit {base} ({shape.describe()})")
    return checked


def remove(root: str | Path, name: str) -> Path:
    run_dir = find(root, name)
    if is_locked(RunDir(run_dir).lock):
        raise Conflict(f"{run_dir}: a training process is writing this run; stop it first")
    shutil.rmtree(run_dir)
    return run_dir
