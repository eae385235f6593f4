"""One owner at a time: a run directory has one writer, a workspace one scheduler, a job one
worker.

A lock is a small file holding its owner's pid and host, held with flock(2). The kernel drops
the lock when the owner exits, however it exits (kill -9 included), so a lock left behind by a
dead process is simply taken over, with no guessing from pids. Nothing here imports MLX.
"""

import fcntl
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .errors import Conflict, UserError


@dataclass(frozen=True)
class Holder:
    pid: int
    host: str

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}"


def read_holder(path: Path) -> Optional[Holder]:
    try:
        raw = json.loads(Path(path).read_text())
        return Holder(int(raw["pid"]), str(raw["host"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


class FileLock:
    """An exclusive lock on `path`, held until `release` (or the process ends)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.fd: Optional[int] = None

    def try_acquire(self) -> Optional[Holder]:
        """Take the lock: None when it is ours now, else who holds it."""
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise UserError(f"{self.path}: cannot create the lock file ({e.strerror})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return read_holder(self.path) or Holder(0, "an unknown host")
            # The previous owner may have deleted the file between our open and our lock; then
            # we hold a lock nobody else can see, and must lock the file that is there now.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode())
        self.fd = fd
        return None

    def acquire(self, what: str) -> "FileLock":
        """Take the lock or raise Conflict naming `what` and the holder."""
        holder = self.try_acquire()
        if holder is not None:
            raise Conflict(f"{what} is in use by another process ({holder.describe()}); "
                           "wait for it to end or stop it first")
        return self

    def release(self, delete: bool = False) -> None:
        """Let go; with delete=True the file goes too. That is safe: a process that opened the
        file before it went sees, once it holds the lock, that the path no longer names it."""
        if self.fd is None:
            return
        if delete:
            self.path.unlink(missing_ok=True)
        os.close(self.fd)
        self.fd = None


def is_locked(path: str | Path) -> bool:
    """Whether some process holds the lock at `path` (a snapshot: it may change at once)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
