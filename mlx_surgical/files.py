"""Writing files so that a crash never leaves half of one: every file and output directory is
built under a temporary name beside its destination and renamed into place when complete.
Also the JSON-lines files (metrics, job events) and file checksums.

Staged files and directories get the permissions of any other new file (0644 and 0755 under
the usual umask 022), whatever the writer did: tempfile's mkstemp/mkdtemp and safetensors
make them private (0600, 0700), which keeps adapters and exports from Ollama's service user,
a shared folder or another account.

Nothing here imports MLX, so the registry, the job store and the server can use it freely.
"""

import hashlib
import json
import os
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def _staging_name(out: Path, suffix: str) -> Path:
    """A hidden name beside `out` that no other writer picks (64 random bits)."""
    return out.parent / f".{out.name}.{secrets.token_hex(8)}{suffix}"


def current_umask() -> int:
    """The process's umask, read without changing it where Linux shows it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _share_like_new_files(path: Path) -> None:
    """Give `path` (and a directory's contents) the modes a new file and folder get."""
    umask = current_umask()
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)


@contextmanager
def staged_file(out: str | Path, suffix: str = "") -> Iterator[Path]:
    """A temporary path beside `out`, renamed onto it only when the writer finished.
    `suffix` keeps an extension for writers that insist on one (mx.save_safetensors)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    name = _staging_name(out, f".tmp{suffix}")
    os.close(os.open(name, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))  # O_EXCL: a name nobody else holds
    try:
        yield name
        _share_like_new_files(name)
        os.replace(name, out)
    finally:
        name.unlink(missing_ok=True)


@contextmanager
def staged_directory(out: str | Path, create: bool = True) -> Iterator[Path]:
    """Build an output directory beside its destination and move it into place only when
    complete, so a failure never leaves half a directory (or destroys the old one). With
    create=False the staging path does not exist yet, for writers that refuse an existing
    directory (mlx-lm's converter)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = _staging_name(out, "")
    if create:
        staging.mkdir()
    try:
        yield staging
        _share_like_new_files(staging)
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
