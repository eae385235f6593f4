"""MLX's fused CPU kernels compiled for AVX2 (backend.ensure_vector_kernels) against compiled as
the wheel does, for mlx_surgical and mlx_lm.lora, side by side on this CPU.

Run as:
    python scripts/kernel_flags_bench.py [--model smollm2|small|tiny] [--rounds 3]

Trains speed_bench.py's setting (its model shapes, float32, batch 1 x 4, 2 warm-up and 30 timed
updates) in both modes, rounds interleaved and the mode order alternating, so the machine's drift
falls on both. MLX caches compiled kernels by a name that does not include the compiler flags,
so each mode gets its own kernel cache (TMPDIR), filled by a short run before the timed rounds.
The CPU is printed first: the gain holds for the CPU it was measured on.
"""

import argparse
import os
import statistics
import tempfile
from pathlib import Path

from mlx_surgical.backend import (VECTOR_OPT_OUT, cpu_description, prepare_cpu_backend, search_path_without_wrapper,
                                  vector_compiler_dir, vector_kernels_active)

prepare_cpu_backend()  # before mlx is imported, like the CLI

import speed_bench  # noqa: E402  (this folder's benchmark: the same setting, the same runners)
from mlx_surgical.model import load_tokenizer  # noqa: E402
from mlx_surgical.tiny import BENCHMARK_SHAPES, build_tiny_model  # noqa: E402

SYSTEMS = ("mlx_surgical", "mlx_lm.lora")
VECTOR, WHEEL = "AVX2 kernels", "wheel's kernels"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=list(BENCHMARK_SHAPES), default="smollm2")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(f"cpu: {cpu_description()}", flush=True)
    updates = speed_bench.DEFAULT_UPDATES[args.model]
    wrapper = str(vector_compiler_dir())
    plain_path = search_path_without_wrapper()
    if not vector_kernels_active():
        raise SystemExit("vectorised kernels do not apply on this machine (see mlx_surgical/backend.py)")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = build_tiny_model(work / "model", BENCHMARK_SHAPES[args.model])
        tokenizer = load_tokenizer(str(model_dir))
        texts = [tokenizer.decode(ids[:speed_bench.MAX_LEN]) for ids, _ in speed_bench.examples(model_dir)]
        modes = {VECTOR: {"PATH": f"{wrapper}{os.pathsep}{plain_path}", VECTOR_OPT_OUT: "1"},
                 WHEEL: {"PATH": plain_path, VECTOR_OPT_OUT: "0"}}
        for i, env in enumerate(modes.values()):
            env["TMPDIR"] = str(work / f"kernels{i}")
            os.mkdir(env["TMPDIR"])

        def run(mode: str, system: str, name: str, timed: int) -> float:
            os.environ.update(modes[mode])  # the runners' subprocesses inherit it
            out = work / name
            out.mkdir()
            result = (speed_bench.bench_mlx_surgical(model_dir, timed, out) if system == "mlx_surgical"
                      else speed_bench.bench_mlx_lm(model_dir, timed, out, texts))
            return result["tokens_per_second"]

        for i, mode in enumerate(modes):
            for j, system in enumerate(SYSTEMS):
                run(mode, system, f"fill{i}{j}", 1)
        speeds = {(mode, system): [] for mode in modes for system in SYSTEMS}
        for r in range(args.rounds):
            for i, mode in enumerate((VECTOR, WHEEL) if r % 2 == 0 else (WHEEL, VECTOR)):
                for j, system in enumerate(SYSTEMS):
                    speeds[mode, system].append(run(mode, system, f"round{r}-{i}{j}", updates))
    median = {key: statistics.median(values) for key, values in speeds.items()}
    print(f"model '{args.model}', {updates} timed updates, {args.rounds} interleaved rounds (tokens/s, median)")
    print(f"{'kernels':<18} {'mlx_surgical':>13} {'mlx_lm.lora':>12} {'ours / mlx_lm':>14}")
    for mode in modes:
        rounds = ", ".join(f"{v:.0f}" for v in speeds[mode, "mlx_surgical"])
        print(f"{mode:<18} {median[mode, 'mlx_surgical']:>13.0f} {median[mode, 'mlx_lm.lora']:>12.0f} "
              f"{median[mode, 'mlx_surgical'] / median[mode, 'mlx_lm.lora']:>14.2f}   (ours by round: {rounds})")
    for system in SYSTEMS:
        print(f"{system}: {VECTOR} / {WHEEL} {median[VECTOR, system] / median[WHEEL, system]:.2f}")


if __name__ == "__main__":
    main()
