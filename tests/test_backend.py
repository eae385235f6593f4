"""doctor and the OpenBLAS preload that makes MLX's CPU backend fast on Linux."""

import json
import os
import platform
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from mlx_surgical.backend import (CACHE_ENV, KERNEL_PREAMBLE, MLX_KERNEL_FLAGS, REEXECED, VECTOR_CPU_FLAGS,
                                  VECTOR_FLAGS, VECTOR_OPT_OUT, cpu_flags, find_openblas, mlx_include_dir,
                                  vector_compiler_dir)

linux_with_openblas = pytest.mark.skipif(platform.system() != "Linux" or find_openblas() is None,
                                         reason="only Linux with a system OpenBLAS preloads it")
x86_with_vector_units = pytest.mark.skipif(
    platform.system() != "Linux" or platform.machine() != "x86_64" or not VECTOR_CPU_FLAGS <= cpu_flags()
    or not shutil.which("g++") or not shutil.which("objdump"),
    reason="vectorised kernels apply on Linux x86_64 CPUs with AVX2, FMA and F16C, and need g++ (objdump to check)")

# A process that prepares the backend as the CLI does, then runs a function mx.compile fuses into
# one kernel that MLX compiles with g++ (the fast exp of the training step).
FUSED_EXP = """
import sys
from mlx_surgical.backend import prepare_cpu_backend, describe
prepare_cpu_backend()
import json, mlx.core as mx, numpy as np
from mlx_surgical.forward import fast_exp
x = mx.linspace(-100.0, 100.0, 100_003)
np.save(sys.argv[1], np.array(mx.compile(fast_exp)(x)))
print(json.dumps(describe()))
"""


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


@x86_with_vector_units
def test_mlx_compiles_its_kernels_for_the_vector_units_with_the_same_results(tmp_path):
    outputs, kernels = {}, {}
    without_wrapper = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if p != str(vector_compiler_dir()))
    # The opted-out process inherits this session's wrapper on its PATH, and must drop it.
    for mode, setting, path in (("vector", "1", without_wrapper), ("wheel", "0", os.environ["PATH"])):
        mlx_tmp = tmp_path / mode
        mlx_tmp.mkdir()
        env = {**os.environ, "PATH": path, "TMPDIR": str(mlx_tmp), CACHE_ENV: str(tmp_path / "cache"),
               VECTOR_OPT_OUT: setting}
        result = subprocess.run([sys.executable, "-c", FUSED_EXP, str(tmp_path / f"{mode}.npy")], env=env,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        kernels[mode] = json.loads(result.stdout.splitlines()[-1])["kernels"]
        outputs[mode] = np.load(tmp_path / f"{mode}.npy")
        libraries = list(mlx_tmp.rglob("*.so"))
        assert libraries, "MLX compiled no kernel"
        disassembly = "".join(subprocess.run(["objdump", "-d", str(lib)], capture_output=True, text=True).stdout
                              for lib in libraries)
        # AVX2 works on 256-bit ymm registers; code for plain x86-64 has none.
        assert ("%ymm" in disassembly) == (mode == "vector"), mode
    assert kernels["vector"].startswith("fused kernels compiled with -mavx2 -mfma -mf16c -ffp-contract=off")
    assert kernels["wheel"] == "fused kernels compiled as the wheel does (no AVX2)"
    assert np.array_equal(outputs["vector"], outputs["wheel"])
    assert (tmp_path / "cache" / "mlx-jit" / "g++").stat().st_mode & 0o111


@x86_with_vector_units
def test_kernels_compile_from_the_precompiled_preamble_to_the_same_code(tmp_path):
    mlx_tmp, cache = tmp_path / "mlx", tmp_path / "cache"
    mlx_tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(mlx_tmp), CACHE_ENV: str(cache), VECTOR_OPT_OUT: "1",
           "PATH": os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if p != str(vector_compiler_dir()))}
    result = subprocess.run([sys.executable, "-c", FUSED_EXP, str(tmp_path / "out.npy")], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    [precompiled] = cache.glob(f"mlx-jit/preamble-*/{KERNEL_PREAMBLE}.gch")
    source = sorted(mlx_tmp.rglob("*.cpp"))[0]
    command = [*MLX_KERNEL_FLAGS, "-shared", "-I", str(mlx_include_dir()), str(source)]
    # -H lists each header read; "! " marks a precompiled one that g++ found valid and used.
    wrapped = subprocess.run([str(cache / "mlx-jit" / "g++"), "-H", *command, "-o", str(tmp_path / "a.so")],
                             capture_output=True, text=True, timeout=120)
    assert f"! {precompiled}" in wrapped.stderr.splitlines()
    plain = subprocess.run(["g++", *VECTOR_FLAGS, *command, "-o", str(tmp_path / "b.so")], capture_output=True,
                           text=True, timeout=120)
    assert plain.returncode == 0, plain.stderr
    code = [subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(tmp_path / lib)], capture_output=True,
                           text=True).stdout.split("\n", 3)[3] for lib in ("a.so", "b.so")]
    assert code[0] == code[1]
