"""The one exception type for problems the user can fix (bad config, bad data, wrong model),
and reading the user's files so that every way they can fail becomes one such problem.

The CLI prints its lines and exits with status 2; the server answers 4xx. Anything else
that escapes is a bug in mlx_surgical and keeps its traceback.
"""

import json
from pathlib import Path
from typing import Any


class UserError(Exception):
    """A problem in the user's input. Each entry of `problems` is one self-contained line
    naming the file, line or field and how to fix it."""

    def __init__(self, *problems: str):
        self.problems = [p for p in problems if p]
        super().__init__("\n".join(self.problems))


class NotFound(UserError):
    """The named job, run or adapter does not exist (HTTP 404)."""


class TrainingDiverged(UserError):
    """The loss became NaN or infinite; the run keeps its last checkpoint."""


class TrainingInterrupted(Exception):
    """Ctrl-C or a stop request: the callbacks have written a checkpoint, then this is raised."""


def read_user_text(path: Path, what: str, hint: str = "") -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: {what} file not found{hint}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read {what} file: {e}") from None


def parse_user_json(text: str, path: Path) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}:{e.colno}: malformed JSON: {e.msg}") from None
