"""What the server does to its workspace beyond jobs: keep uploaded data files, and remove a
run only when no job is still writing it."""

import hashlib
from pathlib import Path
from typing import Any

from ..config import RUN_NAME_CHARS
from ..data import check_records, read_records
from ..errors import Conflict, UserError
from ..files import write_text_atomic
from ..jobs import JobStore
from ..registry import remove

UPLOADS = "uploads"
DATA_SUFFIXES = (".jsonl", ".json")


def save_upload(store: JobStore, raw: Any) -> dict:
    """Store `{"name": "train.jsonl", "text": "..."}` as `uploads/<hash>-<name>` in the workspace,
    after reading it exactly as training will; the returned path goes in data.train or
    data.valid. The name carries the content's hash, so a queued job's data never changes."""
    if not isinstance(raw, dict) or not isinstance(raw.get("name"), str) or not isinstance(raw.get("text"), str):
        raise UserError('upload: send {"name": "FILE.jsonl", "text": "...the file\'s contents..."}')
    name = raw["name"]
    if Path(name).suffix not in DATA_SUFFIXES or not set(name) <= RUN_NAME_CHARS or name.startswith("."):
        raise UserError(f"upload: '{name}': name a .jsonl or .json file with letters, digits, '.', '_', '-'")
    try:
        content = raw["text"].encode("utf-8")
    except UnicodeEncodeError as e:
        raise UserError(f"upload: '{name}': not valid text ({e.reason} at character {e.start})") from None
    path = store.workspace / UPLOADS / f"{hashlib.sha256(content).hexdigest()[:12]}-{name}"
    existed = path.exists()
    if not existed:
        path.parent.mkdir(exist_ok=True)
        write_text_atomic(path, raw["text"])
    try:
        records = read_records(path)
        check_records(records, name)
    except UserError as e:
        if not existed:
            path.unlink()
        # Name the user's file, not where the server put it.
        raise UserError(*(p.replace(str(path), name) for p in e.problems)) from None
    return {"path": str(path.relative_to(store.workspace)), "examples": len(records)}


def remove_run(store: JobStore, name: str) -> Path:
    """Delete a run's directory, unless a job is queued for it or training it."""
    if busy := store.unfinished(name):
        raise Conflict(f"adapter '{name}': job {busy[0].id} is {busy[0].state} on it; stop it first")
    return remove(store.adapters, name)
