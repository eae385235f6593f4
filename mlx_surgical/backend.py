"""Which MLX backend runs, what makes MLX's CPU backend fast on Linux, and the one rule for
saying so when a run is about to take a path much slower than one the user can switch to.

The Linux `mlx[cpu]` wheel links a reference BLAS that runs sgemm at 2-4 GFLOP/s on one
thread; the same process with OpenBLAS preloaded runs it at 150-490, by CPU and kernel set.
`ensure_fast_blas` re-executes the current command once with OpenBLAS in LD_PRELOAD when it
applies (Linux, CPU backend, a system OpenBLAS present, not opted out with
MLX_SURGICAL_FAST_BLAS=0). It runs before MLX is imported and never on macOS (Metal) or with CUDA.

The same wheel is built for plain x86-64, so the elementwise kernels `mx.compile` fuses and
compiles with g++ at run time get no AVX2 either; `ensure_vector_kernels` has them compiled for
the CPU's vector units, as an MLX built on an AVX2 machine does (opt out with
MLX_SURGICAL_VECTOR_KERNELS=0), and from a precompiled preamble, so a first run compiles them
about 4x faster. `prepare_cpu_backend` does both, and lets MLX's scheduler
interleave work on two CPU streams (`blas_threads` and train.py's paired micro-batches).
"""

import ctypes
import ctypes.util
import hashlib
import importlib.util
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from .console import command_line
from .errors import UserError
from .files import write_text_atomic
from .provenance import read_provenance

if TYPE_CHECKING:
    from .config import RunConfig
    from .shape import ModelShape

OPT_OUT = "MLX_SURGICAL_FAST_BLAS"
REEXECED = "_MLX_SURGICAL_BLAS_REEXEC"
# Debian/Ubuntu (libopenblas0-pthread), Fedora/RHEL, Arch, conda-style prefixes.
OPENBLAS_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblasp.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)
INSTALL_HINT = ("install OpenBLAS: `apt-get install libopenblas0-pthread` (Debian/Ubuntu), `dnf install openblas` "
                "(Fedora/RHEL) or `conda install openblas`; mlx-surgical then preloads it by itself")

# How much slower the slow paths train, as measured on 2-core Linux x86_64 machines: the
# quickstart at 16.9 s/update with the wheel's reference BLAS against 1.16 with OpenBLAS, and a
# 4-bit base with float16 unquantized parts at 8.14 s/update against 0.27 with float32 ones
# (MLX's CPU backend has no fast float16 matmul) (issue 18). With dequantized matmuls
# (tuning.py) the 6 x 256 quickstart model trained at 0.32 s/update 4-bit against 0.21 float32,
# and MLX's own quantized_matmul took 3.6-14x as long per micro-batch as dequantizing.
NO_OPENBLAS_SLOWDOWN = 14
HALF_PRECISION_SLOWDOWN = 30
QUANTIZED_SLOWDOWN = 1.5
NATIVE_QUANTIZED_SLOWDOWN = "4-14"

CACHE_ENV = "MLX_SURGICAL_CACHE"
# The instruction-set extensions that change which CPU kernels win.
SPEED_FLAGS = {"avx2": "AVX2", "avx512f": "AVX-512", "amx_tile": "AMX", "asimd": "NEON", "sve": "SVE"}

VECTOR_OPT_OUT = "MLX_SURGICAL_VECTOR_KERNELS"
# What MLX's JIT adds to its g++ command when MLX itself was built for AVX2 (jit_compiler.cpp),
# and no fused multiply-add contraction, so the kernels compute bit for bit what the wheel's do.
VECTOR_FLAGS = ("-mavx2", "-mfma", "-mf16c", "-ffp-contract=off")
VECTOR_CPU_FLAGS = {"avx2", "fma", "f16c"}
# Every fused kernel's source starts by including this header, which g++ parsed afresh each time:
# 0.70-0.82 s a kernel, 0.17-0.22 s from a precompiled copy (the same machine code; AMD Zen 3 and
# Zen 4), and a first run compiles 50-90 kernels. g++ uses a precompiled header only if it was
# built with the code-generating options of MLX's own command (cpu/jit_compiler.cpp), and else
# parses the header as before.
KERNEL_PREAMBLE = "mlx/backend/cpu/compiled_preamble.h"
MLX_KERNEL_FLAGS = ("-std=c++17", "-O3", "-Wall", "-fPIC")

# MLX orders a graph for evaluation breadth first up to this many arrays, then depth first, and
# keeps only ~100 ops queued ahead. At its default (20) two micro-batches on two CPU streams ran
# one after the other (1.4 cores busy); breadth first they interleave: 1.9 cores, SmolLM2's shape
# 859 -> 672 ms a pair (AMD Zen 5), with the same peak memory on one stream.
BFS_WIDTH_ENV, BFS_WIDTH = "MLX_BFS_MAX_WIDTH", "1000"


def cache_dir() -> Path:
    """mlx_surgical's cache: fetched models and per-machine measurements."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "mlx_surgical")


def _cpuinfo_field(info: str, key: str) -> str:
    """A field of the first processor in /proc/cpuinfo ("" when absent)."""
    return (re.search(rf"^{key}\s*:\s*(.*)$", info, re.M) or [None, ""])[1].strip()


def _flags_in(info: str) -> set[str]:
    return set(_cpuinfo_field(info, "flags").split() or _cpuinfo_field(info, "Features").split())


def cpu_flags() -> set[str]:
    """The CPU's instruction-set flags as Linux lists them (empty elsewhere)."""
    try:
        return _flags_in(Path("/proc/cpuinfo").read_text())
    except OSError:
        return set()


def cpu_description() -> str:
    """The CPU's model name with the facts that tell kinds apart when the name does not
    ("AMD EPYC" covers several generations): vendor family/model and the vector extensions."""
    if platform.system() == "Darwin":
        name = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True,
                              text=True).stdout.strip()
        return name or platform.processor() or platform.machine()
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    field = lambda key: _cpuinfo_field(info, key)  # noqa: E731
    flags = _flags_in(info)
    extensions = [label for flag, label in SPEED_FLAGS.items() if flag in flags]
    family = f"family {field('cpu family')} model {field('model')}" if field("cpu family") else platform.machine()
    return f"{field('model name') or platform.machine()} ({family}; {', '.join(extensions) or 'no vector extensions'})"


def find_openblas() -> Optional[str]:
    for prefix in (os.environ.get("CONDA_PREFIX"), sys.prefix):
        if prefix and (Path(prefix) / "lib" / "libopenblas.so.0").exists():
            return str(Path(prefix) / "lib" / "libopenblas.so.0")
    return next((p for p in OPENBLAS_CANDIDATES if Path(p).exists()), None)


def preloaded_openblas() -> Optional[str]:
    """The OpenBLAS library in LD_PRELOAD (as `ensure_fast_blas` puts it there), or None."""
    return next((p for p in os.environ.get("LD_PRELOAD", "").split() if "openblas" in p), None)


def openblas_preloaded() -> bool:
    return preloaded_openblas() is not None


def _cuda_wheel_installed() -> bool:
    for name in ("mlx-cuda", "mlx_cuda"):
        try:
            version(name)
            return True
        except PackageNotFoundError:
            pass
    return False


def fast_blas_applies() -> bool:
    return (platform.system() == "Linux" and os.environ.get(OPT_OUT, "1") != "0"
            and not openblas_preloaded() and not _cuda_wheel_installed())


def fast_blas_environment() -> Optional[dict]:
    """The environment to re-execute with, or None when nothing is to be done."""
    if os.environ.get(REEXECED) or not fast_blas_applies():
        return None
    library = find_openblas()
    if library is None:
        return None
    env = dict(os.environ)
    env["LD_PRELOAD"] = f"{library} {env['LD_PRELOAD']}" if env.get("LD_PRELOAD") else library
    env[REEXECED] = "1"
    return env


def reexec(env: dict) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def ensure_fast_blas() -> None:
    """Re-execute this command with OpenBLAS preloaded, once, when it applies. Call it before
    anything imports mlx."""
    env = fast_blas_environment()
    if env is not None:
        reexec(env)


def vector_compiler_dir() -> Path:
    return cache_dir() / "mlx-jit"


def _is_wrapper_dir(entry: str) -> bool:
    return Path(entry).name == vector_compiler_dir().name and (Path(entry) / "g++").is_file()


def search_path_without_wrapper() -> str:
    """PATH without any vector-kernel g++ wrapper: where the real compiler is found."""
    return os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if not _is_wrapper_dir(p))


def vector_kernels_active() -> bool:
    """The g++ that MLX finds first is the wrapper (this process's, or an inherited one)."""
    return _is_wrapper_dir(os.environ.get("PATH", "").split(os.pathsep)[0])


def ensure_vector_kernels() -> None:
    """Have MLX's CPU backend compile the kernels `mx.compile` fuses for this CPU's AVX2 and FMA
    units: MLX runs `g++` through the shell for each kernel it compiles, so a `g++` that adds
    VECTOR_FLAGS goes first on PATH (Linux x86_64 with AVX2, FMA and F16C, g++ installed, not
    opted out; opting out also drops a wrapper inherited from a parent process). Training steps
    on the SmolLM2 shape took 409 ms instead of 430 on an AMD Zen 5, with the same results bit for
    bit. Kernels already in MLX's cache (its folder under the temporary directory) stay as they
    were compiled; subprocesses inherit the PATH."""
    applies = (platform.system() == "Linux" and platform.machine() == "x86_64"
               and os.environ.get(VECTOR_OPT_OUT) != "0" and VECTOR_CPU_FLAGS <= cpu_flags())
    if applies and vector_kernels_active():
        return
    search = search_path_without_wrapper()
    if search != os.environ.get("PATH", ""):
        os.environ["PATH"] = search
    if not applies:
        return
    compiler = shutil.which("g++", path=search)
    if compiler is None:  # then MLX compiles no kernels either
        return
    script = compiler_wrapper(compiler)
    wrapper = vector_compiler_dir() / "g++"
    try:
        if not (wrapper.is_file() and os.access(wrapper, os.X_OK) and wrapper.read_text() == script):
            write_text_atomic(wrapper, script, executable=True)
            for stale in wrapper.parent.glob("preamble-*"):  # of an earlier MLX or compiler
                if stale.name not in script:
                    shutil.rmtree(stale, ignore_errors=True)
    except (OSError, UserError):  # an unwritable cache costs speed, nothing else
        return
    os.environ["PATH"] = f"{wrapper.parent}{os.pathsep}{search}"


def mlx_include_dir() -> Optional[Path]:
    """The C++ headers the MLX wheel ships, found without importing MLX."""
    spec = importlib.util.find_spec("mlx")
    locations = list(spec.submodule_search_locations or []) if spec else []
    return next((Path(p) / "include" for p in locations if (Path(p) / "include" / KERNEL_PREAMBLE).is_file()), None)


def compiler_wrapper(compiler: str) -> str:
    """The `g++` MLX runs: the real one with VECTOR_FLAGS and, first on the include path, a
    precompiled KERNEL_PREAMBLE, which its first call builds (about 2 s; 50 MB in the cache).
    Where one cannot be built, kernels compile as before."""
    flags = " ".join(VECTOR_FLAGS)
    include = mlx_include_dir()
    try:
        mlx_version = version("mlx")
    except PackageNotFoundError:
        include = None
    if include is None:
        return f'#!/bin/sh\nexec {shlex.quote(compiler)} {flags} "$@"\n'
    real = Path(compiler).resolve()
    # A precompiled header holds for one compiler build and one MLX's headers.
    key = hashlib.sha256(f"{real}|{real.stat().st_mtime}|{include}|{mlx_version}".encode()).hexdigest()[:12]
    precompiled = vector_compiler_dir() / f"preamble-{key}"
    gch = shlex.quote(str(precompiled / f"{KERNEL_PREAMBLE}.gch"))
    build = (f'{shlex.quote(compiler)} {flags} {" ".join(MLX_KERNEL_FLAGS)} -I {shlex.quote(str(include))} '
             f'-x c++-header {shlex.quote(str(include / KERNEL_PREAMBLE))} -o "$gch.$$" 2>/dev/null')
    return (f'#!/bin/sh\n'
            f'gch={gch}\n'
            f'if [ ! -f "$gch" ]; then\n'
            f'  mkdir -p "${{gch%/*}}" && {build} && mv -f "$gch.$$" "$gch"\n'
            f'  rm -f "$gch.$$"\n'
            f'fi\n'
            f'exec {shlex.quote(compiler)} {flags} -I {shlex.quote(str(precompiled))} "$@"\n')


def prepare_cpu_backend() -> None:
    """Call before anything imports mlx: OpenBLAS (by re-executing), then vectorised kernels."""
    ensure_fast_blas()
    ensure_vector_kernels()
    interleave_cpu_streams()


def interleave_cpu_streams() -> None:
    """Before MLX's first evaluation: let two streams' work interleave (see BFS_WIDTH)."""
    os.environ.setdefault(BFS_WIDTH_ENV, BFS_WIDTH)


def keep_freed_memory() -> None:
    """Let glibc keep freed memory for reuse instead of returning it to the OS.

    A training step frees and re-allocates the same few hundred MB every step. glibc serves
    large blocks with mmap and trims its heap eagerly, so each step gets fresh zeroed pages:
    1.2 million page faults in a 128-example benchmark here, with a quarter of the CPU time in
    the kernel. Serving blocks up to 32 MB (glibc's maximum) from the heap and not trimming it
    cut the faults five-fold and made training 10% faster; peak memory is unchanged, as the
    same peak is reached either way."""
    if platform.system() != "Linux" or not on_cpu_backend():
        return
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError):  # not glibc: musl has no mallopt
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    mallopt(M_MMAP_THRESHOLD, 32 * 1024 * 1024)
    mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1)


def _openblas_thread_calls():
    """OpenBLAS's (get, set) thread-count functions when it is loaded in this process, else None."""
    try:
        process = ctypes.CDLL(None)
        return process.openblas_get_num_threads, process.openblas_set_num_threads
    except (OSError, AttributeError):
        return None


def blas_thread_count() -> Optional[int]:
    """OpenBLAS's thread count, or None when no OpenBLAS is loaded (whose threads could be set)."""
    calls = _openblas_thread_calls()
    return calls[0]() if calls else None


@contextmanager
def blas_threads(count: Optional[int]):
    """Run the block with OpenBLAS on `count` threads (None: as it is), then restore the count.
    Two CPU streams each calling a 2-thread BLAS on 2 cores ran 1.4x slower than one stream."""
    calls = _openblas_thread_calls() if count is not None else None
    if calls is None:
        yield
        return
    get, set_ = calls
    before = get()
    set_(count)
    try:
        yield
    finally:
        set_(before)


def on_cpu_backend() -> bool:
    """MLX runs on its CPU backend: no fast vectorised exp, no fast quantized matmul, and BLAS
    speed only in float32."""
    import mlx.core as mx  # not at the top: this module runs before MLX may be loaded (ensure_fast_blas)

    return mx.default_device() == mx.cpu


def training_dtype(requested: str) -> str:
    """model.dtype as training (and so evaluation and generation) uses it: 'auto' is float32 on
    the CPU backend, where it is the only dtype that reaches the fast BLAS, and the stored dtype
    elsewhere (Metal, CUDA)."""
    return "float32" if requested == "auto" and on_cpu_backend() else requested


def default_convert_dtype() -> str:
    """The dtype `convert` writes unquantized parts in: what trains fastest on this backend."""
    return "float32" if on_cpu_backend() else "float16"


def blas_warning() -> Optional[str]:
    """Why MLX's CPU backend on Linux runs with the slow reference BLAS, and the fix; None when
    it does not."""
    if platform.system() != "Linux" or not on_cpu_backend() or openblas_preloaded():
        return None
    library = find_openblas()
    if library is None:
        return (f"MLX's CPU backend is using the slow reference BLAS: training runs about {NO_OPENBLAS_SLOWDOWN}x "
                f"slower than with OpenBLAS. Fix: {INSTALL_HINT}.")
    return (f"OpenBLAS is installed ({library}) but not in use, so training runs about {NO_OPENBLAS_SLOWDOWN}x "
            f"slower: run through the mlx-surgical command, without {OPT_OUT}=0.")


def machine_memory_gb() -> Optional[float]:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    except (ValueError, OSError, AttributeError):
        return None


def slow_path_warnings(config: "RunConfig", shape: "ModelShape") -> list[str]:
    """One line for each way this run would train much slower than it could on this machine,
    with the factor and the exact fix. Empty on Metal and CUDA."""
    if not on_cpu_backend():
        return []
    warnings = [blas_warning()]
    dtype = training_dtype(config.model.dtype)
    if dtype in ("float16", "bfloat16"):
        warnings.append(f"model.dtype is {dtype}: on MLX's CPU backend that trains about {HALF_PRECISION_SLOWDOWN}x "
                        'slower than float32. Fix: "dtype": "float32" (or "auto") in the config\'s model section.')
    if shape.quant_bits and config.training.cpu_quantized_matmul == "native":
        warnings.append(f"training.cpu_quantized_matmul is native: on MLX's CPU backend its quantized_matmul "
                        f"trains about {NATIVE_QUANTIZED_SLOWDOWN}x slower than dequantized matmuls. "
                        'Fix: "cpu_quantized_matmul": "auto" in the config\'s training section.')
    memory = machine_memory_gb()
    float32_gb = 4 * shape.parameter_count / 1e9
    # Only where the user can switch: the float32 weights must leave room to train.
    if shape.quant_bits and memory and float32_gb < memory / 2:
        source = read_provenance(Path(config.model.path)).source
        fix = (command_line("mlx-surgical", "convert", source, "--bits", "none", "--dtype", "float32") if source
               else "convert the unquantized original with `mlx-surgical convert SOURCE --bits none --dtype float32`")
        warnings.append(f"{config.model.path} is {shape.quant_bits}-bit: on MLX's CPU backend a quantized base "
                        f"trains about {QUANTIZED_SLOWDOWN:g}x slower than float32 weights, which fit this machine "
                        f"({float32_gb:.1f} GB of {memory:.0f} GB). Fix: {fix}, and point model.path at the result.")
    return [w for w in warnings if w]


def measure_sgemm_gflops(n: int = 512, repeats: int = 20) -> float:
    """float32 matrix multiply throughput of MLX's default device, as used by training."""
    import mlx.core as mx

    a, b = mx.random.normal((n, n)), mx.random.normal((n, n))
    mx.eval(a, b)
    for _ in range(2):
        mx.eval(a @ b)
    start = time.perf_counter()
    for _ in range(repeats):
        mx.eval(a @ b)
    return 2 * n ** 3 * repeats / (time.perf_counter() - start) / 1e9


def openblas_kernels() -> str:
    """Which of its kernel sets the preloaded OpenBLAS runs, and who chose it. The set decides
    its speed: on an AMD Zen 5, sgemm ran at 223-249 GFLOP/s with the AVX2 "Haswell" set that an
    OPENBLAS_CORETYPE setting forced and at 360-490 with the AVX-512 "Cooperlake" set OpenBLAS
    chose itself. A forced set is kept: it is how a machine avoids a set that is wrong on its CPU."""
    try:
        corename = ctypes.CDLL(preloaded_openblas() or "").openblas_get_corename
    except (OSError, AttributeError):
        return "kernel set unknown"
    corename.restype = ctypes.c_char_p
    forced = os.environ.get("OPENBLAS_CORETYPE")
    return f"{corename().decode()} kernels ({f'set by OPENBLAS_CORETYPE={forced}' if forced else 'its own choice'})"


def describe() -> dict:
    """Facts for `mlx-surgical doctor` and the server's health route."""
    import mlx.core as mx

    device = mx.default_device()
    backend = ("metal" if mx.metal.is_available() else
               "cuda" if hasattr(mx, "cuda") and mx.cuda.is_available() else "cpu")
    facts = {"os": f"{platform.system()} {platform.release()} {platform.machine()}",
             "mlx": mx.__version__, "backend": backend, "device": str(device)}
    if backend == "cpu" and platform.system() == "Linux":
        facts["blas"] = (f"OpenBLAS, {openblas_kernels()} (preloaded: {os.environ['LD_PRELOAD']})"
                         if openblas_preloaded() else "reference BLAS from the mlx-cpu wheel (slow)")
        if platform.machine() == "x86_64":
            facts["kernels"] = (f"fused kernels compiled with {' '.join(VECTOR_FLAGS)}" if vector_kernels_active()
                                else "fused kernels compiled as the wheel does (no AVX2)")
    elif backend == "cpu":
        facts["blas"] = "Accelerate"
    else:
        facts["blas"] = f"{backend} kernels"
    return facts
