"""Training speed side by side: mlx_surgical, mlx_lm.lora and PyTorch + PEFT on the same CPU.

Run as:
    python scripts/speed_bench.py [--model small|smollm2|tiny] [--updates N] [--rounds 1]

Builds the model with the package's factory ("small": hidden 512, 8 layers, 8 heads,
intermediate 1376, vocab 32016, tied embeddings, 41.7M parameters; "smollm2": the shape of
SmolLM2-135M-Instruct, 30 layers, hidden 576, 9/3 heads, intermediate 1536, vocab 49152, tied,
with random weights, which train at the same speed as real ones), formats the bundled
instruction pairs as CodeLlama prompts, and trains the same number of optimizer updates with
the same settings in each system: float32, LoRA rank 8 / alpha 16 / dropout 0.05 on q/k/v of
every layer, batch 1 x 4 accumulation, AdamW at 1e-4. The first two updates (compilation,
warm-up) are timed separately; 2 + 30 updates take every system through all 104 examples at
least once, so the peak memory of each includes the longest example. Peak memory is shown
twice: the process's resident memory, and for the MLX systems the peak MLX itself allocated.
Each system runs in its own process: both MLX ones with OpenBLAS preloaded and MLX's fused
kernels compiled for the CPU's AVX2 (mlx_surgical does both by itself; mlx_lm.lora inherits
them, so the two MLX trainers compare on the same MLX), PyTorch + PEFT (when torch,
transformers and peft import) with its own BLAS and nothing preloaded. With --rounds N the three systems take turns N times and each is shown by
its median round, as a shared machine's speed drifts by 10-20% over minutes.

Two more mlx_surgical rows: the same model converted to 4 bits (QLoRA; its frozen matmuls take
the path tuning.py measures fastest), and a first run on a machine, with MLX's kernel cache
and mlx_surgical's measured compute paths both empty, whose extra wall time is the cold-start
cost a new user pays once. The CPU is printed first: a speed holds for the CPU it was measured on.
"""

import argparse
import importlib.util
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mlx_surgical.backend import prepare_cpu_backend

prepare_cpu_backend()  # before mlx is imported, like the CLI

from mlx_surgical.backend import CACHE_ENV, cpu_description, describe, measure_sgemm_gflops  # noqa: E402
from mlx_surgical.config import config_from_dict, save_config  # noqa: E402
from mlx_surgical.data import read_records, sample_path, to_messages  # noqa: E402
from mlx_surgical.prompt import PromptFormat  # noqa: E402
from mlx_surgical.rundir import RunDir, RunInfo  # noqa: E402
from mlx_surgical.tiny import BENCHMARK_SHAPES, build_tiny_model  # noqa: E402

FIVE_MINUTES = 300
# "tiny" does 30 updates in about a second, so one-time work (a trace for each new batch shape,
# about 40 shapes in the bundled data) would be most of what is timed; it runs 300.
DEFAULT_UPDATES = {"small": 30, "smollm2": 30, "tiny": 300}
WARMUP_UPDATES, ACCUM, LR, MAX_LEN = 2, 4, 1e-4, 512
MLX_PEAK = "MLX peak memory GB:"
# mlx_lm.lora as its console script runs it, then the peak of memory MLX allocated, which its
# report does not show. Nothing else is imported, so its resident memory is its own.
MLX_LM_LORA = ("import sys, mlx.core as mx\nfrom mlx_lm import lora\nsys.argv = ['mlx_lm.lora', *sys.argv[1:]]\n"
               f"lora.main()\nprint('{MLX_PEAK}', round(mx.get_peak_memory() / 1e9, 4))\n")


def examples(model_dir: Path) -> list[tuple[list[int], int]]:
    from mlx_surgical.model import load_tokenizer

    fmt = PromptFormat(load_tokenizer(str(model_dir)))
    return [fmt.example_ids(*to_messages(r)) for r in read_records(sample_path("train"))]


def run_measured(command: list[str], log: Path, env: dict | None = None) -> tuple[float, float]:
    """Run a command to completion; returns its peak resident memory in GB (every system is
    measured this way, so they compare) and its wall time in seconds."""
    tic = time.perf_counter()
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{command[:4]} failed:\n{log.read_text()[-3000:]}")
    return usage.ru_maxrss * 1024 / 1e9, time.perf_counter() - tic  # ru_maxrss: kilobytes on Linux


def cold_environment(work: Path) -> dict:
    """A first run on a new machine: MLX compiles its CPU kernels under the temporary
    directory, and mlx_surgical has measured no compute path yet."""
    for name in ("cold-tmp", "cold-cache"):
        (work / name).mkdir()
    return {**os.environ, "TMPDIR": str(work / "cold-tmp"), CACHE_ENV: str(work / "cold-cache")}


def bench_mlx_surgical(model_dir: Path, updates: int, work: Path, name: str = "mlx_surgical",
                       env: dict | None = None) -> dict:
    config = config_from_dict({
        "model": {"path": str(model_dir), "dtype": "float32"},
        "data": {"train": str(sample_path("train"))},
        "training": {"iters": updates + WARMUP_UPDATES, "learning_rate": LR, "warmup_steps": 0,
                     "grad_accumulation_steps": ACCUM, "max_seq_length": MAX_LEN, "save_every": 10 ** 6},
        "output": {"dir": str(work), "name": name}})
    save_config(config, work / f"{name}.json")
    peak, wall = run_measured([sys.executable, "-m", "mlx_surgical", "train", "--no-progress",
                               str(work / f"{name}.json")], work / f"{name}.log", env)
    rows = RunDir(work / name).metric_rows()
    warm, timed = rows[:WARMUP_UPDATES], rows[WARMUP_UPDATES:]
    return {"tokens_per_second": sum(r["tokens_per_second"] * r["seconds"] for r in timed)
            / sum(r["seconds"] for r in timed),
            "warmup_seconds": sum(r["seconds"] for r in warm), "peak_memory_gb": peak,
            "mlx_peak_gb": max(r["peak_memory_gb"] for r in rows), "wall_seconds": wall,
            "compute_path": RunInfo.load(work / name).compute_path}


def bench_mlx_lm(model_dir: Path, updates: int, work: Path, texts: list[str]) -> dict:
    data = work / "mlx_lm_data"
    data.mkdir()
    for split in ("train", "valid"):
        (data / f"{split}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    config = work / "mlx_lm.yaml"
    config.write_text(json.dumps({"lora_parameters": {"rank": 8, "scale": 2.0, "dropout": 0.05,
                                                      "keys": ["self_attn.q_proj", "self_attn.k_proj",
                                                               "self_attn.v_proj"]}}))
    iters = (updates + WARMUP_UPDATES) * ACCUM
    log = work / "mlx_lm.log"
    peak, _ = run_measured([sys.executable, "-c", MLX_LM_LORA, "--model", str(model_dir), "--train", "--data",
                          str(data), "--iters", str(iters), "--batch-size", "1", "--grad-accumulation-steps",
                          str(ACCUM), "--num-layers", "-1", "--learning-rate", str(LR), "--max-seq-length",
                          str(MAX_LEN), "--steps-per-report", str(ACCUM), "--steps-per-eval", str(10 ** 6),
                          "--val-batches", "1", "--adapter-path", str(work / "mlx_lm_adapter"), "-c", str(config)], log)
    # mlx-lm's report table: "iter  train_loss  tok/s  tokens", one row per update here.
    text = re.sub(r"\x1b\[[0-9;]*m", "", log.read_text())
    rates = [float(m.group(1).replace(",", "")) for m in re.finditer(r"^\s*\d+\s+[\d.]+ \S\s+([\d,]+)\s", text, re.M)]
    timed = rates[WARMUP_UPDATES:]
    mlx_peak = float(re.search(rf"^{re.escape(MLX_PEAK)} ([\d.]+)$", text, re.M).group(1))
    return {"tokens_per_second": sum(timed) / len(timed), "warmup_seconds": None, "peak_memory_gb": peak,
            "mlx_peak_gb": mlx_peak}


def bench_torch_in_subprocess(model_dir: Path, updates: int, work: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "_MLX_SURGICAL_BLAS_REEXEC")}
    env["MLX_SURGICAL_FAST_BLAS"] = "0"  # the torch process must not re-execute with OpenBLAS
    out = work / "torch.json"
    peak, _ = run_measured([sys.executable, __file__, "--torch-only", str(model_dir), "--updates", str(updates),
                         "--out", str(out)], work / "torch.log", env)
    return {**json.loads(out.read_text()), "peak_memory_gb": peak}


def bench_torch(model_dir: Path, updates: int) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM.from_pretrained(str(model_dir), torch_dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05,
                                             target_modules=["q_proj", "k_proj", "v_proj"], task_type="CAUSAL_LM"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.01)
    model.train()
    data = examples(model_dir)
    seconds, tokens, position = [], [], 0
    for _ in range(updates + WARMUP_UPDATES):
        start, count = time.perf_counter(), 0
        for _ in range(ACCUM):
            ids, loss_start = data[position % len(data)]
            position += 1
            ids = ids[:MAX_LEN]
            labels = [-100] * loss_start + ids[loss_start:]
            loss = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss / ACCUM
            loss.backward()
            count += len(ids) - 1
        optimizer.step()
        optimizer.zero_grad()
        seconds.append(time.perf_counter() - start)
        tokens.append(count)
    return {"tokens_per_second": sum(tokens[WARMUP_UPDATES:]) / sum(seconds[WARMUP_UPDATES:]),
            "warmup_seconds": sum(seconds[:WARMUP_UPDATES])}


def median_round(runs: list[dict]) -> dict:
    """A system's figures from its median-speed round, with every round's speed."""
    speeds = [r["tokens_per_second"] for r in runs]
    middle = sorted(runs, key=lambda r: r["tokens_per_second"])[(len(runs) - 1) // 2]
    return {**middle, "tokens_per_second": statistics.median(speeds), "rounds": speeds}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=list(BENCHMARK_SHAPES), default="small")
    parser.add_argument("--updates", type=int, help="timed updates (default: 30, 300 for tiny)")
    parser.add_argument("--rounds", type=int, default=1, help="runs of each system, in turn; the median is shown")
    parser.add_argument("--torch-only", type=Path, help=argparse.SUPPRESS)  # the PyTorch process
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.updates = args.updates or DEFAULT_UPDATES[args.model]
    if args.torch_only:
        args.out.write_text(json.dumps(bench_torch(args.torch_only, args.updates)))
        return
    from mlx.utils import tree_flatten
    from mlx_lm.utils import load

    from mlx_surgical.convert import convert_model
    from mlx_surgical.model import load_tokenizer

    print(f"cpu: {cpu_description()}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = build_tiny_model(work / "model", BENCHMARK_SHAPES[args.model])
        quantized_dir = convert_model(str(model_dir), work / "model-4bit", bits=4, group_size=64, dtype="float32")
        tokenizer = load_tokenizer(str(model_dir))
        texts = [tokenizer.decode(ids[:MAX_LEN]) for ids, _ in examples(model_dir)]
        results = {"mlx_surgical, first run": bench_mlx_surgical(model_dir, args.updates, work, "cold",
                                                                  cold_environment(work))}
        peers = {"mlx_surgical": lambda out: bench_mlx_surgical(model_dir, args.updates, out),
                 "mlx_lm.lora": lambda out: bench_mlx_lm(model_dir, args.updates, out, texts)}
        if all(importlib.util.find_spec(m) for m in ("torch", "transformers", "peft")):
            peers["PyTorch + PEFT"] = lambda out: bench_torch_in_subprocess(model_dir, args.updates, out)
        else:
            print("PyTorch + PEFT skipped: torch, transformers or peft is not installed")
        # The systems take turns, round after round, so a change in the machine's speed (a shared
        # host) falls on all of them; each is reported by its median round.
        rounds = {name: [] for name in peers}
        for i in range(args.rounds):
            for name, run in peers.items():
                out = work / f"round{i}-{name.replace(' ', '')}"
                out.mkdir()
                rounds[name].append(run(out))
        results.update({name: median_round(runs) for name, runs in rounds.items()})
        results["mlx_surgical 4-bit"] = bench_mlx_surgical(quantized_dir, args.updates, work, "q4")
        params = sum(v.size for _, v in tree_flatten(load(str(model_dir))[0].parameters()))
    gflops = max(measure_sgemm_gflops(1024, 10) for _ in range(3))  # best of three: the machine is shared
    ceiling = gflops * 1e9 / (4 * params)  # forward + input-gradient backward, frozen weights
    facts = describe()
    print(f"machine: {facts['os']}, {os.cpu_count()} cores, MLX {facts['mlx']} {facts['backend']}, {facts['blas']}")
    print(f"model '{args.model}': {params / 1e6:.1f}M parameters; sgemm {gflops:.0f} GFLOP/s -> 4N FLOPs/token "
          f"ceiling {ceiling:.0f} tokens/s; {args.updates} timed updates of batch 1 x {ACCUM}")
    base = results["mlx_surgical"]["tokens_per_second"]
    print(f"{'system':<24} {'tokens/s':>9} {'ours/this':>10} {'of ceiling':>11} {'warm-up s':>10} {'peak GB':>8} "
          f"{'MLX peak GB':>12}")
    for name, r in results.items():
        warm = f"{r['warmup_seconds']:.1f}" if r["warmup_seconds"] is not None else "-"
        peak = f"{r['peak_memory_gb']:.2f}" if r["peak_memory_gb"] is not None else "-"
        mlx_peak = f"{r['mlx_peak_gb']:.3f}" if "mlx_peak_gb" in r else "-"
        each = " (rounds: " + ", ".join(f"{v:.0f}" for v in r["rounds"]) + ")" if len(r.get("rounds", [])) > 1 else ""
        print(f"{name:<24} {r['tokens_per_second']:>9.0f} {base / r['tokens_per_second']:>10.2f} "
              f"{r['tokens_per_second'] / ceiling:>11.0%} {warm:>10} {peak:>8} {mlx_peak:>12}{each}")
    cold, warm_run = results["mlx_surgical, first run"], results["mlx_surgical"]
    extra = cold["wall_seconds"] - warm_run["wall_seconds"]
    print(f"{results['mlx_surgical']['compute_path']}; 4-bit {results['mlx_surgical 4-bit']['compute_path']}")
    print(f"first run on this machine: {cold['wall_seconds']:.1f} s against {warm_run['wall_seconds']:.1f} s with warm "
          f"caches: +{extra:.1f} s once, {extra / FIVE_MINUTES:.0%} of a 5-minute run")
    print(f"4-bit / float32 speed: {results['mlx_surgical 4-bit']['tokens_per_second'] / base:.2f}")


if __name__ == "__main__":
    main()
