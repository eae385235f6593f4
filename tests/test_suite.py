"""The suite's own rule: in CI (MLX_SURGICAL_TESTS_NO_SKIPS=1) a skipped test fails the run."""

import os
import subprocess
import sys
from pathlib import Path

SKIPPING = '''
import pytest
pytest.importorskip("a_module_nobody_has")

def test_never_collected():
    pass
'''
SOME_SKIPPED = '''
import pytest

def test_runs():
    pass

def test_needs_a_tool():
    pytest.skip("no such tool here")
'''


def run_pytest(tmp_path: Path, no_skips: str) -> subprocess.CompletedProcess:
    (tmp_path / "test_skipping_module.py").write_text(SKIPPING)
    (tmp_path / "test_some_skipped.py").write_text(SOME_SKIPPED)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent), "MLX_SURGICAL_TESTS_NO_SKIPS": no_skips}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no_skips", "-p", "no:cacheprovider",
                           "--rootdir", str(tmp_path), str(tmp_path)], capture_output=True, text=True, env=env,
                          timeout=120)


def test_a_skip_fails_the_run_only_where_every_test_must_run(tmp_path):
    relaxed = run_pytest(tmp_path, "0")
    assert relaxed.returncode == 0 and "1 passed, 2 skipped" in relaxed.stdout, relaxed.stdout
    strict = run_pytest(tmp_path, "1")
    assert strict.returncode == 1 and "1 passed, 2 skipped" in strict.stdout, strict.stdout
    assert "could not import 'a_module_nobody_has'" in strict.stdout and "no such tool here" in strict.stdout
