"""doctor and the OpenBLAS preload that makes MLX's CPU backend fast on Linux."""

import os
import platform
import re
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
    # The kernel set OpenBLAS runs decides its speed, so doctor names it and who chose it.
    forced = os.environ.get("OPENBLAS_CORETYPE")
    chooser = f"set by OPENBLAS_CORETYPE={forced}" if forced else "its own choice"
    assert "backend  cpu" in fast
    assert re.search(rf"blas     OpenBLAS, \w+ kernels \({re.escape(chooser)}\) \(preloaded", fast)
    slow = doctor(MLX_SURGICAL_FAST_BLAS="0")
    assert "reference BLAS" in slow and "advice" in slow
    assert gflops(fast) > 0 and gflops(slow) > 0


@linux_with_openblas
def test_this_test_session_runs_with_openblas_too():
    assert "openblas" in os.environ.get("LD_PRELOAD", "")


def test_slow_paths_are_named_with_their_factor_and_fix(make_config):
    from mlx_surgical.backend import on_cpu_backend, slow_path_warnings, training_dtype
    from mlx_surgical.shape import ModelShape

    config = make_config()
    shape = ModelShape("llama", 64, 192, 2, 4, 2, 512, 16)
    if not on_cpu_backend():
        assert training_dtype("auto") == "auto" and slow_path_warnings(config, shape) == []
        return
    assert training_dtype("auto") == "float32"
    assert slow_path_warnings(config, shape) == []  # float32, unquantized, OpenBLAS in this session
    config.model.dtype = "bfloat16"
    (half,) = slow_path_warnings(config, shape)
    assert "about 30x slower than float32" in half and '"dtype": "float32"' in half
    config.model.dtype = "float32"
    four_bit = ModelShape("llama", 64, 192, 2, 4, 2, 512, 16, quant_bits=4)
    (quantized,) = slow_path_warnings(config, four_bit)
    assert "4-bit" in quantized and "about 1.5x slower" in quantized and "--bits none --dtype float32" in quantized
    config.training.cpu_quantized_matmul = "native"
    native, _ = slow_path_warnings(config, four_bit)
    assert "about 4-14x slower" in native and '"cpu_quantized_matmul": "auto"' in native


@linux_with_openblas
def test_training_without_openblas_says_so_before_it_starts(make_config, tmp_path):
    from mlx_surgical.config import save_config

    path = tmp_path / "run.json"
    save_config(make_config(), path)
    clean = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", REEXECED)}
    result = subprocess.run([sys.executable, "-m", "mlx_surgical", "plan", str(path), "--no-probe"],
                            capture_output=True, text=True, env={**clean, "MLX_SURGICAL_FAST_BLAS": "0"}, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stderr.startswith(f"warning: OpenBLAS is installed ({find_openblas()}) but not in use, so training "
                                    "runs about 14x slower")
