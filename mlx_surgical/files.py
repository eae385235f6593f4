"""Writing files so that a crash never leaves half of one: every file and output directory is
built under a temporary name beside its destination, flushed to disk, and renamed into place
when complete. Also the JSON-lines files (metrics, job events) and file checksums.

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
from typing import Iterator, Optional

from safetensors import SafetensorError

from .errors import UserError

# Staging names: ".<name>.<random>.tmp[<suffix>]", so leftovers of a killed writer are recognisable.
STAGING_MARK = ".tmp"


def is_staging(path: Path) -> bool:
    return path.name.startswith(".") and STAGING_MARK in path.name


def remove_staging_leftovers(directory: str | Path) -> list[Path]:
    """Delete what a writer killed mid-write left in `directory` (call it only while owning the
    directory, or another writer's work in progress goes with it)."""
    directory = Path(directory)
    removed = [p for p in directory.iterdir() if is_staging(p)] if directory.is_dir() else []
    for path in removed:
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink(missing_ok=True)
    return removed


def fsync_path(path: Path) -> None:
    """Flush a file's data, or a directory's entries, to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_failed(out: Path, error: Exception) -> UserError:
    reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
    return UserError(f"{out}: cannot be written ({reason}); check free space and permissions there")


def make_directory(path: str | Path) -> Path:
    """`path` as a directory, created with its parents if need be; failing is one clear line."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise write_failed(path, e) from None
    return path


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


def _share_like_new_files(path: Path, executable: bool = False) -> None:
    """Give `path` (and a directory's contents) the modes a new file (or program) and folder get."""
    umask = current_umask()
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        os.chmod(p, (0o777 if p.is_dir() or executable else 0o666) & ~umask)


@contextmanager
def staged_file(out: str | Path, suffix: str = "", executable: bool = False) -> Iterator[Path]:
    """A temporary path beside `out`, renamed onto it only when the writer finished and the data
    reached the disk. `suffix` keeps an extension for writers that insist on one; an executable
    file is one before it gets its name, so nobody can run it half-made or unrunnable."""
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        name = _staging_name(out, f"{STAGING_MARK}{suffix}")
        os.close(os.open(name, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))  # O_EXCL: a name nobody else holds
    except OSError as e:
        raise write_failed(out, e) from None
    try:
        yield name
        _share_like_new_files(name, executable)
        fsync_path(name)
        os.replace(name, out)
        fsync_path(out.parent)
    except (OSError, SafetensorError) as e:
        raise write_failed(out, e) from None
    finally:
        name.unlink(missing_ok=True)


def replace_problem(out: Path, reads: list[Path], folder: bool) -> Optional[str]:
    """Why `--force` must not replace `out`, or None: it is, or holds, what the command reads, or it
    is not an earlier output of its kind (for a folder, one holding files only, as every export and
    converted model does; for a file, a file)."""
    target = out.resolve()
    for source in reads:
        if target == source.resolve() or target in source.resolve().parents:
            relation = "is" if target == source.resolve() else "holds"
            return f"{out}: {relation} {source}, which this command reads; choose another --out"
    if not out.exists():
        return None
    if folder and (not out.is_dir() or any(p.is_dir() for p in out.iterdir())):
        return (f"{out}: --force replaces an earlier output only, and this is "
                f"{'a folder holding folders' if out.is_dir() else 'a file'}; choose another --out")
    if not folder and out.is_dir():
        return f"{out}: --force replaces an earlier output file only, and this is a folder; choose another --out"
    return None


@contextmanager
def staged_directory(out: str | Path, create: bool = True) -> Iterator[Path]:
    """Build an output directory beside its destination and move it into place only when
    complete and on disk, so a failure never leaves half a directory (or destroys the old one).
    With create=False the staging path does not exist yet, for writers that refuse an existing
    directory (mlx-lm's converter)."""
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = _staging_name(out, STAGING_MARK)
        if create:
            staging.mkdir()
    except OSError as e:
        raise write_failed(out, e) from None
    replaced = None
    try:
        yield staging
        _share_like_new_files(staging)
        for path in sorted(staging.rglob("*"), reverse=True):  # files before the folders holding them
            fsync_path(path)
        fsync_path(staging)
        if out.exists() or out.is_symlink():
            replaced = out.with_name(f"{staging.name}.old{STAGING_MARK}")
            os.rename(out, replaced)
        try:
            os.rename(staging, out)
        except OSError:
            if replaced is not None:
                os.rename(replaced, out)
                replaced = None
            raise
        fsync_path(out.parent)
    except (OSError, SafetensorError) as e:
        raise write_failed(out, e) from None
    finally:
        for leftover in (staging, replaced):
            if leftover is not None and leftover.exists():
                shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()


def write_text_atomic(path: str | Path, text: str, executable: bool = False) -> None:
    with staged_file(path, executable=executable) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | Path, data) -> None:
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def write_jsonl_atomic(path: str | Path, rows: list) -> None:
    write_text_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))


def read_json_or_empty(path: str | Path) -> dict:
    """A JSON object from a file the program wrote itself, or {} when it is missing or
    unreadable (the registry lists what it can)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}


def not_a_file(path: str | Path) -> UserError:
    return UserError(f"{path}: is a directory, not a file; move the directory out of the way")


def read_jsonl(path: str | Path) -> list[dict]:
    """The rows of a JSON-lines file (metrics, job events); [] when it does not exist yet. A line
    cut short by a writer that was killed is left out."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return []
    except IsADirectoryError:
        raise not_a_file(path) from None
    rows = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def append_jsonl(path: str | Path, row: dict) -> None:
    path = Path(path)
    try:
        with path.open("ab") as f:
            # After a torn last line (a killed writer), start on a line of our own.
            torn = f.tell() > 0 and _last_byte(path) != b"\n"
            f.write((b"\n" if torn else b"") + (json.dumps(row) + "\n").encode())
    except OSError as e:
        raise write_failed(path, e) from None


def _last_byte(path: Path) -> bytes:
    with path.open("rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    try:
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except IsADirectoryError:
        raise not_a_file(path) from None
    return digest.hexdigest()
