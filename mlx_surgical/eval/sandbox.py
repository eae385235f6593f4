"""Run generated code so that it cannot harm the user: one confined process per candidate.

Each candidate runs as `python -I program.py` in a process of its own (see confine.py for the
inside), started in a new session with an empty environment and stdin closed, under rlimits
on CPU time, address space, file size, open files and processes, and stopped with its whole
process group at a wall-clock timeout. On Linux it also runs in new mount, network and PID
namespaces: no network, a read-only filesystem apart from a private temporary directory,
the home directory hidden, and every process it starts ending with it; started by root it
runs as an unprivileged user id of its own. Root without namespaces is refused rather than
run unguarded. `Isolation.enforced()` says what holds on this machine.
"""

import functools
import json
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from .confine import TIMED_OUT

CONFINE = Path(__file__).with_name("confine.py")
PYTHON = os.path.realpath(sys.executable)
# Limits below the settings' level of interest: generous for a test file, fatal to a runaway.
FILE_BYTES = 16 << 20
OPEN_FILES = 64
PROCESSES = 32
SCRATCH_MB = 64
OUTPUT_CHARS = 2000
# User ids without a passwd entry, far above any real account: one per candidate, so its
# process count starts at zero and it owns nothing on disk.
SANDBOX_UIDS = (1_900_000_000, 2_000_000_000)
POLL_SECONDS = 0.01
# With namespaces the launcher keeps the wall-clock limit itself (see confine.py); this process
# steps in only if the launcher has not ended this long after it.
LAUNCHER_GRACE_SECONDS = 5.0


@dataclass
class Outcome:
    status: str  # passed | failed | timeout | killed
    exit_code: int
    seconds: float
    output: str  # the end of what the program printed, stdout and stderr interleaved

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@dataclass(frozen=True)
class Isolation:
    mode: str  # "namespaces" (Linux) or "basic"
    own_uid: bool  # started by root: the candidate runs as an unprivileged uid of its own

    def enforced(self) -> list[str]:
        common = ["own process and session, killed with its process group at the timeout",
                  "python -I, empty environment, stdin closed",
                  "rlimits: CPU time, address space, file size, open files, core dumps"]
        if self.mode == "basic":
            return common + ["a fresh temporary directory as working directory",
                             f"RLIMIT_NPROC: at most {PROCESSES} more processes than the user runs already"]
        return common + [
            "no network (new network namespace: only a loopback that is down)",
            "read-only filesystem except a private tmpfs /tmp (the working directory), /var/tmp and /dev/shm",
            "home directory hidden (only the Python installation shown, read-only)",
            "new PID namespace: other processes invisible, every process started ends with the candidate",
            f"RLIMIT_NPROC: at most {PROCESSES} processes",
        ] + (["runs as an unprivileged user id of its own, not as root"] if self.own_uid else [])

    def not_enforced(self) -> list[str]:
        gaps = ["reading files the user (or, for root, everyone) may read outside the home directory",
                "CPU and memory use of the machine up to the limits, for up to the timeout"]
        if self.mode == "basic":
            gaps = ["network access", "writing or deleting any file the user may write",
                    "processes that leave the session (setsid) outlive the candidate",
                    "reading the user's files, including the home directory"] + gaps[1:]
        return gaps


def _settings(isolation: Isolation, limits: dict, workdir: str = "") -> dict:
    return {"mode": isolation.mode, "python": PYTHON, "python_prefix": os.path.realpath(sys.base_prefix),
            "home": os.path.realpath(Path.home()), "workdir": workdir,
            "uid": random.SystemRandom().randrange(*SANDBOX_UIDS) if isolation.own_uid else None,
            "processes": PROCESSES if isolation.mode == "namespaces" else _user_processes() + PROCESSES,
            "file_bytes": FILE_BYTES, "open_files": OPEN_FILES, "scratch_mb": SCRATCH_MB, **limits}


def _user_processes() -> int:
    """RLIMIT_NPROC counts every process of the user id, so the basic mode's limit sits above
    what the user already runs."""
    listing = subprocess.run(["ps", "-A", "-o", "uid="], capture_output=True, text=True, check=True).stdout
    return sum(1 for line in listing.split() if int(line) == os.getuid())


def _run(isolation: Isolation, program: str, timeout: float, memory_mb: int) -> Outcome:
    limits = {"wall_seconds": timeout, "cpu_seconds": max(1, int(timeout + 0.999)), "memory_bytes": memory_mb << 20}
    with tempfile.TemporaryDirectory(prefix="mlx-surgical-sandbox-") as scratch:
        workdir = os.path.join(scratch, "work")
        os.mkdir(workdir, 0o700)
        output_path = os.path.join(scratch, "output")
        with open(output_path, "wb") as output:
            process = subprocess.Popen([PYTHON, "-I", str(CONFINE), json.dumps(_settings(isolation, limits, workdir))],
                                       stdin=subprocess.PIPE, stdout=output, stderr=subprocess.STDOUT, env={},
                                       cwd=scratch, start_new_session=True)
        start = time.monotonic()
        try:
            process.stdin.write(program.encode())
            process.stdin.close()
        except BrokenPipeError:  # it ended before reading: its output says why
            pass
        grace = LAUNCHER_GRACE_SECONDS if isolation.mode == "namespaces" else 0.0
        timed_out = not _wait_without_reaping(process.pid, start + timeout + grace)
        # The group still exists while its leader is unreaped, so this cannot hit a recycled id.
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        code = process.wait()
        seconds = time.monotonic() - start
        with open(output_path, "rb") as f:
            f.seek(max(0, os.path.getsize(output_path) - OUTPUT_CHARS))
            text = f.read().decode("utf-8", "replace")
    if timed_out or (isolation.mode == "namespaces" and code == TIMED_OUT):
        status = "timeout"
    elif code == 0:
        status = "passed"
    elif code > 128:
        status = "killed"
        text += f"\n[killed by {signal.Signals(code - 128).name}]" if code - 128 in signal.valid_signals() else ""
    else:
        status = "failed"
    return Outcome(status, code, round(seconds, 3), text)


def _wait_without_reaping(pid: int, deadline: float) -> bool:
    """Wait for the process to end, leaving it a zombie; False at the deadline."""
    while time.monotonic() < deadline:
        if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
            return True
        time.sleep(POLL_SECONDS)
    return False


@functools.cache
def detect_isolation() -> Isolation:
    """The strongest isolation this machine allows; refuses root without namespaces."""
    as_root = hasattr(os, "geteuid") and os.geteuid() == 0
    if platform.system() == "Linux":
        probe = _run(Isolation("namespaces", as_root), "pass", timeout=30, memory_mb=1024)
        if probe.passed:
            return Isolation("namespaces", as_root)
        reason = probe.output.strip().splitlines()[-1] if probe.output.strip() else f"exit code {probe.exit_code}"
    else:
        reason = f"{platform.system()} has no namespaces"
    if as_root:
        raise UserError(f"sandbox: cannot isolate generated code ({reason}); mlx-surgical will not run it as root "
                        "unguarded: run the evaluation as a normal user, or on Linux allow namespaces (unshare)")
    return Isolation("basic", False)


class Sandbox:
    """Runs candidate programs one at a time, each in a fresh confined process."""

    def __init__(self, timeout_seconds: float, memory_mb: int):
        self.isolation = detect_isolation()
        self.timeout_seconds = timeout_seconds
        self.memory_mb = memory_mb

    def run(self, program: str) -> Outcome:
        return _run(self.isolation, program, self.timeout_seconds, self.memory_mb)
