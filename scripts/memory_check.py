"""Check plan's memory estimate against measured peak memory on models of several sizes.

Run as:
    python scripts/memory_check.py [--sizes small,medium,large] [--seq-len 512]

Each size is a randomly initialised Llama (float32, the dtype training uses on a Linux CPU)
with surgical LoRA (rank 8 on q/k/v). It trains a few real updates through the library's
loop on random token sequences of the full length, records MLX's peak memory, and prints it
beside `plan.memory_estimate` for the same shape and settings. Sequences are full length so
the measurement and the estimate describe the same worst-case batch.
"""

import argparse
import time

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_map
from mlx_lm.models.llama import Model, ModelArgs

from mlx_surgical.backend import on_cpu_backend
from mlx_surgical.batches import collate
from mlx_surgical.checkpoint import TrainState
from mlx_surgical.config import LoraConfig, TrainingConfig
from mlx_surgical.loss import training_loss
from mlx_surgical.plan import lora_parameter_count, memory_estimate
from mlx_surgical.prompt import Sample
from mlx_surgical.shape import ModelShape
from mlx_surgical.surgery import attach_lora
from mlx_surgical.train import LoopSettings, make_optimizer, train

SIZES = {  # hidden, layers, heads, kv heads, intermediate, vocab
    "tiny": (64, 2, 4, 2, 192, 512),
    "small": (512, 8, 8, 8, 1376, 32016),
    "medium": (768, 12, 12, 12, 2048, 32016),
    "large": (1024, 16, 16, 16, 2816, 32016),
}


def build(size: str):
    hidden, layers, heads, kv, inter, vocab = SIZES[size]
    args = ModelArgs(model_type="llama", hidden_size=hidden, num_hidden_layers=layers, intermediate_size=inter,
                     num_attention_heads=heads, num_key_value_heads=kv, rms_norm_eps=1e-5, vocab_size=vocab,
                     tie_word_embeddings=False)
    model = Model(args)
    model.update(tree_map(lambda p: (mx.random.normal(p.shape) * 0.02).astype(mx.float32), model.parameters()))
    mx.eval(model.parameters())
    shape = ModelShape("llama", hidden, inter, layers, heads, kv, vocab, hidden // heads)
    return model, shape


def measure(size: str, seq_len: int, updates: int = 2, accum: int = 2) -> dict:
    model, shape = build(size)
    lora = LoraConfig()
    attach_lora(model, lora, seed=0)
    training = TrainingConfig(batch_size=1, grad_accumulation_steps=accum, max_seq_length=seq_len)
    rng = np.random.default_rng(0)
    batches = [collate([Sample(rng.integers(3, shape.vocab_size, seq_len + 1).astype(np.int32), 1, "r")], seq_len)
               for _ in range(updates * accum)]
    optimizer = make_optimizer(1e-4, 0.01)
    optimizer.init(model.trainable_parameters())
    mx.clear_cache()
    mx.reset_peak_memory()
    start = time.perf_counter()
    estimate = memory_estimate(shape, lora_parameter_count(shape, lora), training, dtype_bytes=4)
    # The estimate assumes the CPU fast math and paired micro-batches where they may be chosen (they
    # keep more): measure those paths.
    train(model, optimizer, training_loss(model, fast_math=on_cpu_backend()), lambda p: batches[p],
          LoopSettings(updates, accum, 10 ** 9, paired=estimate["micro_batches_at_once"] == 2), TrainState())
    seconds = time.perf_counter() - start
    measured = mx.get_peak_memory() / 1e9
    parameters = sum(v.size for _, v in tree_flatten(model.parameters()))
    return {"size": size, "parameters": parameters, "measured_gb": measured, "estimated_gb": estimate["total_gb"],
            "ratio": estimate["total_gb"] / measured, "seconds": seconds}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="small,medium,large")
    parser.add_argument("--seq-len", type=int, default=512)
    args = parser.parse_args()
    print(f"{'size':<8} {'parameters':>12} {'measured GB':>12} {'estimated GB':>13} {'est/meas':>9}")
    worst = 0.0
    for size in args.sizes.split(","):
        row = measure(size, args.seq_len)
        worst = max(worst, abs(row["ratio"] - 1))
        print(f"{row['size']:<8} {row['parameters']:>12,} {row['measured_gb']:>12.3f} {row['estimated_gb']:>13.3f} "
              f"{row['ratio']:>9.2f}", flush=True)
    print(f"largest deviation: {100 * worst:.0f}% ({'within' if worst <= 0.25 else 'OUTSIDE'} the +-25% target)")


if __name__ == "__main__":
    main()
