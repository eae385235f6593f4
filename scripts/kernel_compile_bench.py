"""How long a first run spends compiling MLX's fused CPU kernels, with and without the precompiled
preamble (backend.compiler_wrapper), side by side on this CPU.

Run as:
    python scripts/kernel_compile_bench.py [--model small|smollm2|tiny] [--rounds 2]

A short cold training run (speed_bench.py's setting, an empty kernel cache and no measured compute
path, so the candidate paths' kernels are compiled too) leaves behind the sources of every kernel
a first run compiles. Each is then compiled both ways, taking turns, as MLX's command does (the
same AVX2 flags), and the two libraries' machine code is compared. The CPU is printed first.
"""

import argparse
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from mlx_surgical.backend import (KERNEL_PREAMBLE, MLX_KERNEL_FLAGS, VECTOR_FLAGS, cpu_description,
                                  mlx_include_dir, prepare_cpu_backend, search_path_without_wrapper,
                                  vector_compiler_dir, vector_kernels_active)

prepare_cpu_backend()  # before mlx is imported, like the CLI

import speed_bench  # noqa: E402  (this folder's benchmark: the same setting, the same runner)
from mlx_surgical.tiny import BENCHMARK_SHAPES, build_tiny_model  # noqa: E402


def compile_seconds(command: list[str]) -> float:
    tic = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    return time.perf_counter() - tic


def machine_code(library: Path) -> str:
    return subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(library)], capture_output=True, text=True,
                          check=True).stdout.split("\n", 3)[3]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=list(BENCHMARK_SHAPES), default="small")
    parser.add_argument("--rounds", type=int, default=2, help="times each kernel is compiled each way")
    args = parser.parse_args()
    print(f"cpu: {cpu_description()}", flush=True)
    if not vector_kernels_active():
        raise SystemExit("the compiler wrapper does not apply on this machine (see mlx_surgical/backend.py)")
    wrapper = str(vector_compiler_dir() / "g++")
    plain = [shutil.which("g++", path=search_path_without_wrapper()), *VECTOR_FLAGS]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = build_tiny_model(work / "model", BENCHMARK_SHAPES[args.model])
        env = speed_bench.cold_environment(work)
        speed_bench.bench_mlx_surgical(model_dir, 1, work, "cold", env)
        sources = sorted((work / "cold-tmp").rglob("*.cpp"))
        header = mlx_include_dir() / KERNEL_PREAMBLE
        build = compile_seconds([*plain, *MLX_KERNEL_FLAGS, "-I", str(mlx_include_dir()), "-x", "c++-header",
                                 str(header), "-o", str(work / "preamble.gch")])
        subprocess.run([wrapper, "--version"], capture_output=True, check=True)  # builds the preamble if absent
        times = {"parsing the preamble": [], "precompiled preamble": []}
        same = 0
        for i, source in enumerate(sources):
            common = [*MLX_KERNEL_FLAGS, "-shared", "-I", str(mlx_include_dir()), str(source)]
            commands = {"parsing the preamble": [*plain, *common, "-o", str(work / "a.so")],
                        "precompiled preamble": [wrapper, *common, "-o", str(work / "b.so")]}
            for r in range(args.rounds):
                for mode in (list(commands) if (i + r) % 2 == 0 else list(commands)[::-1]):
                    times[mode].append(compile_seconds(commands[mode]))
            same += machine_code(work / "a.so") == machine_code(work / "b.so")
    print(f"model '{args.model}': a first run compiled {len(sources)} kernels; building the precompiled "
          f"preamble took {build:.2f} s once")
    print(f"{'mode':<22} {'per kernel (median)':>20} {'all kernels':>12}")
    for mode, values in times.items():
        print(f"{mode:<22} {statistics.median(values):>18.2f} s {sum(values) / args.rounds:>10.1f} s")
    total = {mode: sum(values) / args.rounds for mode, values in times.items()}
    print(f"speed-up {total['parsing the preamble'] / total['precompiled preamble']:.2f}x; saved "
          f"{total['parsing the preamble'] - total['precompiled preamble'] - build:.1f} s of a first run "
          f"(after building the preamble); same machine code in {same} of {len(sources)} kernels")


if __name__ == "__main__":
    main()
