"""The one exception type for problems the user can fix (bad config, bad data, wrong model),
and reading the user's files so that every way they can fail becomes one such problem.

The CLI prints its lines and exits with status 2; the server answers 4xx. Anything else
that escapes is a bug in mlx_surgical and keeps its traceback.
"""

import difflib
import json
from pathlib import Path
from typing import Any, Optional


class UserError(Exception):
    """A problem in the user's input. Each entry of `problems` is one self-contained line
    naming the file, line or field and how to fix it."""

    def __init__(self, *problems: str):
        self.problems = [p for p in problems if p]
        super().__init__("\n".join(self.problems))


class NotFound(UserError):
    """The named job, run or adapter does not exist (HTTP 404)."""


class Conflict(UserError):
    """The request collides with what is already there or running: a run name in use, a run
    another process is writing, a job in the wrong state (HTTP 409)."""


class TrainingDiverged(UserError):
    """The loss or the weights became NaN or infinite; the run keeps its last finite checkpoint."""


class TrainingInterrupted(Exception):
    """Ctrl-C or a stop request: the callbacks have written a checkpoint, then this is raised."""


UTF8_BOM = b"\xef\xbb\xbf"  # some editors start UTF-8 files with it; JSON readers refuse it


def similar_name(path: Path) -> Optional[Path]:
    """What `path` (which does not exist) was probably meant to be: the one file or folder beside it
    with a close name (a typo: models/tiny-lama for models/tiny-llama), or None."""
    try:
        names = [p.name for p in path.parent.iterdir()]
    except OSError:
        return None
    close = difflib.get_close_matches(path.name, names, n=2, cutoff=0.8)
    return path.parent / close[0] if len(close) == 1 else None


def read_user_bytes(path: Path, what: str, hint: str = "") -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        meant = similar_name(path)
        raise UserError(f"{path}: {what} file not found{hint}{f' (did you mean {meant}?)' if meant else ''}") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read {what} file: {e}") from None


def not_utf8(where: str, error: UnicodeDecodeError) -> str:
    return (f"{where}: not valid UTF-8 (byte 0x{error.object[error.start]:02x} at column {error.start + 1}); "
            "save the file as UTF-8")


def not_text(where: str, value: str) -> Optional[str]:
    """What is wrong with a string that cannot be written as UTF-8: half of a UTF-16 pair (JSON's
    "\\ud800" escape) or a byte that was not UTF-8 on the command line. No tokenizer takes it."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        return (f"{where}: not text at character {e.start + 1} (\\u{ord(value[e.start]):04x}, half of a character or "
                "a byte that is not UTF-8); remove it or write the whole character")
    return None


def read_user_text(path: Path, what: str, hint: str = "") -> str:
    """A UTF-8 text file, without a leading BOM; invalid bytes are reported with their line."""
    return decode_user_text(read_user_bytes(path, what, hint), str(path))


def decode_user_text(data: bytes, where: str) -> str:
    """UTF-8 text a user gave (a file, stdin), without a leading BOM; an invalid byte is reported
    with its line and column."""
    data = data.removeprefix(UTF8_BOM)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line_start = data.rfind(b"\n", 0, e.start) + 1
        line_end = data.find(b"\n", e.start)
        line = data[line_start:line_end if line_end >= 0 else len(data)]
        bad = UnicodeDecodeError(e.encoding, line, e.start - line_start, e.end - line_start, e.reason)
        lineno = data.count(b"\n", 0, e.start) + 1
        raise UserError(not_utf8(f"{where}:{lineno}", bad)) from None


def parse_user_json(text: str, path: Path) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}:{e.colno}: malformed JSON: {e.msg}") from None
    except RecursionError:
        raise UserError(f"{path}: JSON nested too deeply to be a config or a data file") from None
