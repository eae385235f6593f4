"""doctor and the OpenBLAS preload that makes MLX's CPU backend fast on Linux."""

import os
import platform
import subprocess
import sys

import pytest

from mlx_surgical.backend import REEXECED, find_openblas

linux_with_openblas = pytest.mark.skipif(platform.system() != "Linux" or find_openblas() is None,
                                         reason="only Linux with a system OpenBLAS preloads it")


def doctor(**env) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", REEXECED)}
    result = subprocess.run([sys.executable, "-m", "mlx_surgical", "doctor"], capture_output=True, text=True,
                            env={**clean, **env}, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def gflops(report: str) -> float:
    return float(next(line for line in report.splitlines() if line.startswith("sgemm")).split()[1])


@linux_with_openblas
def test_the_cli_preloads_openblas_and_the_opt_out_turns_it_off():
    fast = doctor()
    assert "backend  cpu" in fast and "OpenBLAS (preloaded" in fast
    slow = doctor(MLX_SURGICAL_FAST_BLAS="0")
    assert "reference BLAS" in slow and "advice" in slow
    assert gflops(fast) > 0 and gflops(slow) > 0


@linux_with_openblas
def test_this_test_session_runs_with_openblas_too():
    assert "openblas" in os.environ.get("LD_PRELOAD", "")
