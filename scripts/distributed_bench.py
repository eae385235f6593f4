"""Tokens/s of the same run on 1 process and on 2 data-parallel ranks (mlx.launch, ring, loopback).

Run as:
    python scripts/distributed_bench.py [--updates 30] [--hidden 128 --layers 4 | --model smollm2]

Builds a random model (--hidden x --layers, or one of speed_bench.py's shapes with --model), then trains the same config (global batch 2, 2 accumulation steps) once
in one process and once as two ranks on this machine, and prints tokens/s for each and their
ratio. On one 2-core machine the two ranks share the cores, so this measures the overhead of
the gradient all-reduce rather than a speed-up; across two Macs each rank has its own chip.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from mlx_surgical.backend import cpu_description
from mlx_surgical.config import config_from_dict, save_config
from mlx_surgical.data import sample_path
from mlx_surgical.rundir import RunDir, RunInfo
from mlx_surgical.tiny import BENCHMARK_SHAPES, TinyShape, build_tiny_model


def run(command: list[str], run_dir: Path, env: dict) -> dict:
    subprocess.run(command, check=True, capture_output=True, env=env)
    rows = [r for r in RunDir(run_dir).metric_rows() if "loss" in r]
    warm = rows[2:]  # the first updates pay for compilation
    seconds = sum(r["seconds"] for r in warm)
    return {"ranks": RunInfo.load(run_dir).ranks, "tokens_per_second": sum(r["tokens_per_second"] * r["seconds"] for r in warm)
            / seconds, "seconds_per_update": seconds / len(warm)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--updates", type=int, default=30)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--model", choices=sorted(BENCHMARK_SHAPES), default=None,
                        help="One of speed_bench.py's model shapes instead of --hidden x --layers.")
    args = parser.parse_args()
    shape = BENCHMARK_SHAPES[args.model] if args.model else TinyShape(layers=args.layers, hidden_size=args.hidden,
                                                                      intermediate_size=3 * args.hidden)
    print(f"cpu: {cpu_description()}", flush=True)  # a speed holds for the CPU it was measured on
    launch = shutil.which("mlx.launch", path=str(Path(sys.executable).parent)) or "mlx.launch"
    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny_model(Path(tmp) / "model", shape)
        results = []
        for ranks in (1, 2):
            config = config_from_dict({
                "model": {"path": str(model), "dtype": "float32"}, "lora": {"dropout": 0.0},
                "data": {"train": str(sample_path("train"))},
                "training": {"iters": args.updates, "batch_size": 2, "grad_accumulation_steps": 2,
                             "learning_rate": 5e-3, "warmup_steps": 2, "max_seq_length": 512, "save_every": 10 ** 6},
                "output": {"dir": str(Path(tmp) / "adapters"), "name": f"ranks-{ranks}"}})
            path = Path(tmp) / f"ranks-{ranks}.json"
            save_config(config, path)
            train = [sys.executable, "-m", "mlx_surgical", "train", "--no-progress", str(path)]
            command = train if ranks == 1 else [launch, "-n", "2", "--backend", "ring", *train]
            # Ranks sharing one machine split its cores between their BLAS threads.
            threads = str(max(1, (os.cpu_count() or 1) // ranks))
            env = {**os.environ, "OPENBLAS_NUM_THREADS": threads}
            results.append(run(command, Path(tmp) / "adapters" / f"ranks-{ranks}", env))
    print(f"{'ranks':>5} {'tokens/s':>10} {'s/update':>9}")
    for r in results:
        print(f"{r['ranks']:>5} {r['tokens_per_second']:>10.0f} {r['seconds_per_update']:>9.3f}")
    print(f"2 ranks / 1 process: {results[1]['tokens_per_second'] / results[0]['tokens_per_second']:.2f}x tokens/s "
          "(one machine: both ranks share its cores)")


if __name__ == "__main__":
    main()
