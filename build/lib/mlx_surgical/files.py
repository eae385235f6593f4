"""Writing files so that a crash never leaves half of one: every file and output directory is
built under a temporary name beside its destination and renamed into place when complete.
Also the JSON-lines files (metrics, job events) and file checksums.

Nothing here imports MLX, so the registry, the job store and the server can use it freely.
"""

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def staged_file(out: str | Path, suffix: str = "") -> Iterator[Path]:
    """A temporary path beside `out`, renamed onto it only when the writer finished.
    `suffix` keeps an extension for writers that insist on one (mx.save_safetensors)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=f".tmp{suffix}", dir=out.parent)
    os.close(fd)
    try:
        yield Path(name)
        os.replace(name, out)
    finally:
        Path(name).unlink(missing_ok=True)


@contextmanager
def staged_directory(out: str | Path, create: bool = True) -> Iterator[Path]:
    """Build an output directory beside its destination and move it into place only when
    complete, so a failure never leaves half a directory (or destroys the old one). With
    create=False the staging path does not exist yet, for writers that refuse an existing
    directory (mlx-lm's converter)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    if not create:
        staging.rmdir()
    try:
        yield staging
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.rename(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def write_text_atomic(path: str | Path, text: str) -> None:
    with staged_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | Path, data) -> None:
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def read_json_or_empty(path: str | Path) -> dict:
    """A JSON object from a file the program wrote itself, or {} when it is missing or
    unreadable (the registry lists what it can)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def read_jsonl(path: str | Path) -> list[dict]:
    """The rows of a JSON-lines file (metrics, job events); [] when it does not exist yet."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def append_jsonl(path: str | Path, row: dict) -> None:
    with Path(path).open("a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
