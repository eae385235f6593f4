"""The sandbox for generated code, attacked for real: runaway loops, fork bombs, memory hogs,
writes outside the working directory, sockets, secrets in the environment. After each, an
ordinary candidate must still run normally."""

import ast
import os
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from mlx_surgical.eval.sandbox import SANDBOX_UIDS, Sandbox, detect_isolation

TIMEOUT = 3.0
HEALTHY = "import os\nprint(sorted(os.listdir('.')))\n"


@pytest.fixture(scope="module")
def sandbox():
    return Sandbox(timeout_seconds=TIMEOUT, memory_mb=256)


@pytest.fixture
def confined(sandbox):
    """Run the program, then check the next candidate is unaffected: it passes quickly, in a
    fresh directory holding nothing but itself, with no process of the previous one left."""
    def run(program: str):
        outcome = sandbox.run(textwrap.dedent(program))
        after = sandbox.run(HEALTHY)
        assert after.passed and after.seconds < 2, after
        assert after.output.strip() == "['program.py']"
        assert not sandbox_processes()
        return outcome
    return run


def needs_namespaces():
    if detect_isolation().mode != "namespaces":
        pytest.skip("this machine gives the sandbox no namespaces, so this is not prevented (see the README)")


def sandbox_processes() -> list[int]:
    """Processes running under one of the sandbox's own user ids."""
    found = []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        try:
            with open(f"/proc/{entry}/status") as f:
                uid = next(int(line.split()[1]) for line in f if line.startswith("Uid:"))
        except (OSError, StopIteration, ValueError):
            continue
        if SANDBOX_UIDS[0] <= uid < SANDBOX_UIDS[1]:
            found.append(int(entry))
    return found


def test_pass_fail_and_output(confined):
    assert confined("print('hello')").passed
    failed = confined("assert 1 + 1 == 3, 'arithmetic'")
    assert failed.status == "failed" and "AssertionError: arithmetic" in failed.output


def test_infinite_loop_and_sleep_time_out(confined):
    for program in ("while True:\n    pass\n", "import time\ntime.sleep(60)\n"):
        start = time.monotonic()
        outcome = confined(program)
        assert outcome.status == "timeout", outcome
        assert TIMEOUT <= time.monotonic() - start < TIMEOUT + 3


def test_fork_bomb_is_stopped(confined):
    outcome = confined("""
        import os
        while True:
            try:
                os.fork()
            except OSError:
                pass
    """)
    assert outcome.status in ("timeout", "killed"), outcome


def test_fork_bomb_children_that_leave_the_session_end_with_the_candidate(confined):
    needs_namespaces()
    outcome = confined("""
        import os, time
        for _ in range(4):
            if os.fork() == 0:
                os.setsid()
                time.sleep(60)
        print("parent done")
    """)
    assert outcome.passed and "parent done" in outcome.output


def test_memory_hog_is_stopped(confined):
    outcome = confined("""
        hog = []
        while True:
            hog.append(bytearray(64 << 20))
    """)
    assert outcome.status == "failed" and "MemoryError" in outcome.output


def test_huge_file_is_stopped(confined):
    outcome = confined("""
        with open("big", "wb") as f:
            while True:
                f.write(b"x" * (1 << 20))
    """)
    assert outcome.status == "failed" and "File too large" in outcome.output


def test_writes_outside_the_working_directory_fail(confined, tmp_path):
    needs_namespaces()
    refused = [tmp_path / "escaped.txt", os.path.expanduser("~/escaped-from-sandbox.txt"), "/etc/escaped.txt"]
    scratch = "/var/tmp/mlx-surgical-escaped.txt"  # writable, but a private tmpfs that vanishes with the candidate
    outcome = confined(f"""
        for path in {[str(t) for t in refused] + [scratch]!r}:
            try:
                with open(path, "w") as f:
                    f.write("x")
                print("WROTE", path)
            except OSError as e:
                print("refused", path, type(e).__name__)
    """)
    assert outcome.passed, outcome
    assert [line.split()[0] for line in outcome.output.splitlines()] == ["refused"] * len(refused) + ["WROTE"]
    assert not any(os.path.exists(t) for t in refused + [scratch])


def test_network_is_unreachable(confined):
    needs_namespaces()
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        program = f"""
            import socket
            try:
                socket.create_connection(("127.0.0.1", {server.getsockname()[1]}), timeout=2).close()
                print("CONNECTED")
            except OSError as e:
                print("refused", e)
        """
        # The same program outside the sandbox connects, so the refusal below is the sandbox's doing.
        outside = subprocess.run([sys.executable, "-c", textwrap.dedent(program)], capture_output=True, text=True)
        assert "CONNECTED" in outside.stdout
        outcome = confined(program)
    assert outcome.passed and "CONNECTED" not in outcome.output and "refused" in outcome.output


def test_no_secrets_no_stdin_no_home(confined, monkeypatch):
    monkeypatch.setenv("API_TOKEN", "secret-value")
    outcome = confined("""
        import os, sys
        print("env", dict(os.environ))
        print("stdin", sys.stdin)
        try:
            input()
        except Exception as e:
            print("input failed", type(e).__name__)
    """)
    assert outcome.passed and "secret-value" not in outcome.output
    assert "stdin None" in outcome.output and "input failed" in outcome.output


def test_home_directory_and_other_processes_are_hidden(confined):
    needs_namespaces()
    home = os.path.expanduser("~")
    outcome = confined(f"""
        import os
        print("home", sorted(os.listdir({home!r})))
        print("processes", sorted(int(p) for p in os.listdir("/proc") if p.isdigit()))
    """)
    assert outcome.passed, outcome
    assert "processes [1]" in outcome.output
    visible = ast.literal_eval(outcome.output.split("home ", 1)[1].splitlines()[0])
    prefix = os.path.relpath(os.path.realpath(sys.base_prefix), os.path.realpath(home))
    assert visible == ([] if prefix.startswith("..") else [prefix.split(os.sep)[0]])  # the way to Python only
