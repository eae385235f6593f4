"""How the program talks on a terminal: commands it suggests (shell-quoted, so they paste),
counts with the right plural, and a status line while a long step would otherwise be silent.

Nothing here imports MLX.
"""

import shlex
import sys
import threading
import time
import unicodedata
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, TextIO

SPINNER = "|/-\\"


def command_line(*argv: str | Path) -> str:
    """A command as one line that pastes into bash or zsh: every argument quoted as needed."""
    return shlex.join(str(a) for a in argv)


def resume_command(run_dir: str | Path) -> str:
    return command_line("mlx-surgical", "train", "--resume", run_dir)


def counted(n: int | float, noun: str, plural: str = "") -> str:
    """'1 example', '1,040 examples', '2.5 epochs', '0.31 epochs'."""
    if isinstance(n, int):
        number = f"{n:,}"
    else:  # two decimals at most, two significant digits below 1
        number = f"{n:.2g}" if abs(n) < 1 else f"{round(n, 2):,g}"
    return f"{number} {noun if number == '1' else plural or noun + 's'}"


def alternatives(values) -> str:
    """'32, 64 or 128': the values a setting takes, for a message."""
    words = [str(v) for v in values]
    return f"{', '.join(words[:-1])} or {words[-1]}" if len(words) > 1 else "".join(words)


def printable(text: str) -> str:
    """Model output as it is safe to show: control characters other than newline and tab (a
    random or damaged model emits NUL, BEL, escape sequences) written as \\xNN escapes; every
    other character, spaces and joiners of any script included, as it is."""
    return "".join(c if c in "\n\t" or unicodedata.category(c) != "Cc" else repr(c)[1:-1]
                   for c in text.replace("\r\n", "\n"))


def is_terminal(stream: TextIO) -> bool:
    return hasattr(stream, "isatty") and stream.isatty()


@contextmanager
def working(message: str, enabled: bool = True) -> Iterator[None]:
    """Show that a long step (loading a model, a timing probe, a conversion) is under way: on a
    terminal a spinner with the seconds so far, elsewhere one line when it starts and one when
    it ends, so a log shows where the time went."""
    stream = sys.stderr
    if not enabled:
        yield
        return
    start = time.perf_counter()
    done = threading.Event()
    spinner = None
    if is_terminal(stream):
        def spin():
            frame = 0
            while not done.wait(0.2):
                stream.write(f"\r{message} {SPINNER[frame % len(SPINNER)]} {time.perf_counter() - start:.0f}s")
                stream.flush()
                frame += 1

        spinner = threading.Thread(target=spin, daemon=True)
        spinner.start()
    else:
        stream.write(f"{message} ...\n")
        stream.flush()
    finished = False
    try:
        yield
        finished = True
    finally:
        done.set()
        if spinner is not None:
            spinner.join()
            stream.write("\r\033[K")
        if finished:  # a failure says so itself, after this
            stream.write(f"{message}: {time.perf_counter() - start:.1f} s\n")
        stream.flush()
