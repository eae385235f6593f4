"""The adapters/ directory as a registry: list, show, verify and remove runs.

Every run directory explains itself (run.json, adapter_config.json), so the registry keeps
no index of its own: listing reads the directories."""

import hashlib
import json
import shutil
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from .checkpoint import BEST_DIR, RUN_INFO
from .errors import NotFound, UserError
from .surgery import ADAPTER_CONFIG, ADAPTER_FILE

CHECKSUMMED = (ADAPTER_FILE, ADAPTER_CONFIG, f"{BEST_DIR}/{ADAPTER_FILE}", f"{BEST_DIR}/{ADAPTER_CONFIG}")


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

    def to_dict(self) -> dict:
        return asdict(self)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checksums(run_dir: Path) -> dict[str, str]:
    """sha256 of the files a user ships, recorded in run.json when a run finishes."""
    return {name: sha256_file(run_dir / name) for name in CHECKSUMMED if (run_dir / name).exists()}


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def is_adapter_dir(path: Path) -> bool:
    return (path / ADAPTER_CONFIG).exists() and (path / ADAPTER_FILE).exists()


def entry(run_dir: Path) -> AdapterEntry:
    info = _read_json(run_dir / RUN_INFO)
    config = _read_json(run_dir / ADAPTER_CONFIG)
    created = info.get("created") or datetime.fromtimestamp((run_dir / ADAPTER_FILE).stat().st_mtime,
                                                            timezone.utc).isoformat(timespec="seconds")
    return AdapterEntry(
        name=run_dir.name,
        path=str(run_dir),
        status=info.get("status", "exported"),
        base_model=config.get("base_model", {}).get("path", "?"),
        trainable_parameters=info.get("trainable_parameters"),
        size_bytes=(run_dir / ADAPTER_FILE).stat().st_size,
        best_val_loss=(info.get("best") or {}).get("val_loss"),
        final_val_loss=(info.get("final") or {}).get("val_loss"),
        created=created,
    )


def list_adapters(root: str | Path = "adapters") -> list[AdapterEntry]:
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted((entry(p) for p in root.iterdir() if p.is_dir() and is_adapter_dir(p)), key=lambda e: e.created)


def find(root: str | Path, name: str) -> Path:
    """A run by name inside root, or a path to an adapter directory."""
    for candidate in (Path(root) / name, Path(name)):
        if candidate.is_dir() and is_adapter_dir(candidate):
            return candidate
    known = ", ".join(e.name for e in list_adapters(root)) or "none"
    raise NotFound(f"adapter '{name}' not found in {root} (known: {known})")


def show(root: str | Path, name: str) -> dict:
    run_dir = find(root, name)
    return {**entry(run_dir).to_dict(), "adapter_config": _read_json(run_dir / ADAPTER_CONFIG),
            "run": _read_json(run_dir / RUN_INFO)}


def verify(root: str | Path, name: str, model_path: Optional[str] = None) -> list[str]:
    """Check recorded checksums, that the tensors load, and that their shapes fit the base
    model (the recorded one, or `model_path`). Returns what was checked; raises UserError
    listing every failure."""
    from .export.adapter import read_adapter
    from .model import model_shape

    run_dir = find(root, name)
    problems, checked = [], []
    recorded = _read_json(run_dir / RUN_INFO).get("checksums", {})
    for file, expected in recorded.items():
        path = run_dir / file
        if not path.exists():
            problems.append(f"{path}: missing (listed in {RUN_INFO})")
        elif sha256_file(path) != expected:
            problems.append(f"{path}: checksum differs from the one recorded when the run finished")
        else:
            checked.append(f"{file}: checksum ok")
    if not recorded:
        checked.append("no checksums recorded (run unfinished or exported): checked tensors only")
    try:
        adapter = read_adapter(run_dir)
        checked.append(f"{ADAPTER_FILE}: {len(adapter.pairs)} LoRA pairs load")
    except Exception as e:  # a corrupt file can fail in many ways; all mean the same to the user
        raise UserError(*problems, f"{run_dir / ADAPTER_FILE}: cannot be read ({e})") from None
    shape = model_shape(model_path) if model_path else adapter.base_shape()
    base = model_path or adapter.base_model
    for p in adapter.pairs:
        expected_in, expected_out = shape.projection_dims(p.projection)
        if p.layer >= shape.num_layers:
            problems.append(f"{run_dir}: layer {p.layer} does not exist in {base} ({shape.num_layers} layers)")
        elif p.a.shape != (expected_in, adapter.rank) or p.b.shape != (adapter.rank, expected_out):
            problems.append(f"{run_dir}: layer {p.layer} {p.module} has A {p.a.shape}, B {p.b.shape}; {base} "
                            f"needs A ({expected_in}, {adapter.rank}), B ({adapter.rank}, {expected_out})")
    if problems:
        raise UserError(*problems)
    checked.append(f"shapes fit {base} ({shape.describe()})")
    return checked


def remove(root: str | Path, name: str) -> Path:
    run_dir = find(root, name)
    shutil.rmtree(run_dir)
    return run_dir
