"""Where one training micro-step's time goes on this CPU, per op class.

Run as:
    python scripts/profile_step.py [--model smollm2|small|tiny] [--length 104] [--learned 56]

Builds a benchmark model (the shapes of speed_bench.py, random weights), attaches surgical LoRA as
the trainer does (rank 8 on q/k/v, dropout 0.05), and times, each compiled and with its backward
pass, on one sequence of --length tokens of which --learned are response tokens (the defaults are
the bundled pairs' typical bucket):

- the whole micro-step, on both CPU compute paths (forward.py's fast math, MLX's own ops);
- per layer, multiplied by the layer count: the frozen projections' matmuls, what LoRA adds on
  q/k/v (adapter matmuls, dropout, scaling), the attention core, the SwiGLU and RMSNorm + RoPE
  (each as the fast math computes it and as MLX's ops do), and the rest of the block (residual
  adds, layout copies, one dispatch per op) as the whole block less those parts;
- the output head and loss on the learned rows;
- what is left of the step: embedding, the final norm, the gradient tree.

Each figure is the median of interleaved rounds. The CPU is printed first: the split holds for
the CPU it was measured on.
"""

import argparse
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

from mlx_surgical.backend import prepare_cpu_backend

prepare_cpu_backend()  # before mlx is imported, like the CLI

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import numpy as np  # noqa: E402

from mlx_surgical import forward  # noqa: E402
from mlx_surgical.backend import cpu_description, describe, keep_freed_memory, measure_sgemm_gflops  # noqa: E402
from mlx_surgical.config import LoraConfig  # noqa: E402
from mlx_surgical.loss import learned_cross_entropy, training_loss  # noqa: E402
from mlx_surgical.model import load_model  # noqa: E402
from mlx_surgical.surgery import attach_lora  # noqa: E402
from mlx_surgical.tiny import BENCHMARK_SHAPES, build_tiny_model  # noqa: E402
from mlx_surgical.train import compiled_grad_step  # noqa: E402

ROUNDS = 7


def module_gradient(module, fn):
    """fn(module, x) differentiated with respect to the module's trainable parameters and x in
    one backward pass, as inside the training step, compiled."""
    def total(params, x):
        module.update(params)
        return fn(module, x).sum()

    gradient = mx.grad(total, argnums=(0, 1))

    @partial(mx.compile, inputs=[module.state, mx.random.state], outputs=[module.state, mx.random.state])
    def step(x):
        return gradient(module.trainable_parameters(), x)

    return step


def input_gradient(fn, arity: int = 1):
    """fn(*inputs) differentiated with respect to all its inputs, compiled."""
    return mx.compile(mx.grad(lambda *a: fn(*a).sum(), argnums=tuple(range(arity))))


def median_milliseconds(work: dict) -> dict:
    """work: name -> (function, args). Each is warmed twice, then all are timed in turn."""
    for fn, args in work.values():
        for _ in range(2):
            mx.eval(fn(*args))
    times = {name: [] for name in work}
    for _ in range(ROUNDS):
        for name, (fn, args) in work.items():
            tic = time.perf_counter()
            mx.eval(fn(*args))
            times[name].append(time.perf_counter() - tic)
    return {name: statistics.median(t) * 1000 for name, t in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=list(BENCHMARK_SHAPES), default="smollm2")
    parser.add_argument("--length", type=int, default=104, help="tokens in the sequence")
    parser.add_argument("--learned", type=int, default=56, help="response tokens (learned positions)")
    args = parser.parse_args()
    print(f"cpu: {cpu_description()}", flush=True)
    keep_freed_memory()  # as train_run does: without it the larger ops time page faults, not work
    shape = BENCHMARK_SHAPES[args.model]
    with tempfile.TemporaryDirectory() as tmp:
        model = load_model(str(build_tiny_model(Path(tmp) / "model", shape)), dtype="float32").model
    attach_lora(model, LoraConfig(), seed=0)
    model.train()

    L, n, hidden, inter = args.length, args.learned, shape.hidden_size, shape.intermediate_size
    head_dim = hidden // shape.heads
    rng = np.random.default_rng(0)
    tokens = lambda: mx.array(rng.integers(3, shape.vocab_size, (1, L)), mx.int32)  # noqa: E731
    batch = (tokens(), tokens(), mx.arange(L - n, L, dtype=mx.int32), mx.ones((n,), mx.float32))
    x = mx.random.normal((1, L, hidden))
    q = mx.random.normal((1, shape.heads, L, head_dim))
    kv = [mx.random.normal((1, shape.kv_heads, L, head_dim)) for _ in range(2)]
    gate, up = mx.random.normal((1, L, inter)), mx.random.normal((1, L, inter))
    mask = mx.triu(mx.full((L, L), -1e9, mx.float32), k=1)
    # The model's own final hidden states, so the loss meets the step's logits: random vectors
    # gave logits whose exps fell into subnormals, which cost an Intel CPU 1.4x on the loss.
    final_hidden = forward.hidden_states(model, batch[0], fast_math=False)
    mx.eval(x, q, kv, gate, up, mask, final_hidden)

    layer = model.model.layers[0]
    attn, mlp = layer.self_attn, layer.mlp
    frozen = [attn.q_proj.linear, attn.k_proj.linear, attn.v_proj.linear, attn.o_proj, mlp.gate_proj, mlp.up_proj]

    def projections(x, wide):
        return sum(p(x).sum() for p in frozen) + mlp.down_proj(wide).sum()

    def fast_attention(q, k, v):
        return forward.causal_attention(q, k, v, mask)[0]

    def mlx_attention(q, k, v):
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0, mask="causal")

    def norms_rope(x, rope):
        h = layer.input_layernorm(x)
        rotated = rope(h.reshape(1, L, shape.heads, head_dim).transpose(0, 2, 1, 3))
        return layer.post_attention_layernorm(h).sum() + rotated.sum()

    qkv = lambda m, x: m.q_proj(x).sum() + m.k_proj(x).sum() + m.v_proj(x).sum()  # noqa: E731
    base_qkv = lambda x: sum(p(x).sum() for p in frozen[:3])  # noqa: E731
    head_and_loss = lambda h: learned_cross_entropy(model, h, batch[1], batch[2], batch[3], fast_math=True)  # noqa: E731
    steps = {path: compiled_grad_step(model, training_loss(model, fast_math=path == "fast math"),
                                      [model.state, mx.random.state]) for path in ("fast math", "MLX ops")}
    ms = median_milliseconds({
        "step fast math": (steps["fast math"], batch),
        "step MLX ops": (steps["MLX ops"], batch),
        "projections": (input_gradient(projections, 2), (x, gate)),
        "qkv with LoRA": (module_gradient(attn, qkv), (x,)),
        "qkv frozen": (input_gradient(base_qkv), (x,)),
        "attention fast": (input_gradient(fast_attention, 3), (q, *kv)),
        "attention MLX": (input_gradient(mlx_attention, 3), (q, *kv)),
        "swiglu fast": (input_gradient(lambda g, u: forward.swiglu(g, u)[0], 2), (gate, up)),
        "swiglu MLX": (input_gradient(lambda g, u: nn.silu(g) * u, 2), (gate, up)),
        "norms + rope fast": (input_gradient(lambda x: norms_rope(x, lambda h: forward.apply_rope(attn.rope, h)[0])),
                              (x,)),
        "norms + rope MLX": (input_gradient(lambda x: norms_rope(x, attn.rope)), (x,)),
        "block fast": (module_gradient(layer, lambda m, x: forward._fast_block(m, x, mask)), (x,)),
        "block MLX": (module_gradient(layer, lambda m, x: m(x, "causal")), (x,)),
        "head + loss": (input_gradient(head_and_loss), (final_hidden,)),
    })

    layers = shape.layers
    lora = ms["qkv with LoRA"] - ms["qkv frozen"]
    rows = []  # (op class, fast math ms per step, MLX ops ms per step)
    for path in ("fast", "MLX"):
        parts = ms["projections"] + lora + ms[f"attention {path}"] + ms[f"swiglu {path}"] + ms[f"norms + rope {path}"]
        ms[f"rest {path}"] = ms[f"block {path}"] - parts
    rows.append(("frozen projections (7 matmuls)", ms["projections"] * layers, ms["projections"] * layers))
    rows.append(("LoRA on q/k/v (adapter, dropout)", lora * layers, lora * layers))
    rows.append(("attention core", ms["attention fast"] * layers, ms["attention MLX"] * layers))
    rows.append(("SwiGLU", ms["swiglu fast"] * layers, ms["swiglu MLX"] * layers))
    rows.append(("RMSNorm + RoPE", ms["norms + rope fast"] * layers, ms["norms + rope MLX"] * layers))
    rows.append(("rest of the block (adds, copies, dispatch)", ms["rest fast"] * layers, ms["rest MLX"] * layers))
    rows.append(("output head + loss", ms["head + loss"], ms["head + loss"]))
    outside = lambda path, step: step - ms[f"block {path}"] * layers - ms["head + loss"]  # noqa: E731
    rows.append(("outside the layers (embedding, norm, grads)", outside("fast", ms["step fast math"]),
                 outside("MLX", ms["step MLX ops"])))

    facts = describe()
    gflops = max(measure_sgemm_gflops(1024, 10) for _ in range(3))
    print(f"MLX {facts['mlx']} {facts['backend']}, {facts['blas']}; sgemm {gflops:.0f} GFLOP/s")
    print(f"model '{args.model}': {layers} layers, hidden {hidden}, {shape.heads}/{shape.kv_heads} heads, vocab "
          f"{shape.vocab_size}; one sequence of {L} tokens, {n} learned; per micro-step, forward + backward")
    print(f"{'op class':<46} {'fast math ms':>13} {'share':>6} {'MLX ops ms':>11} {'share':>6}")
    for name, fast, plain in rows:
        print(f"{name:<46} {fast:>13.1f} {fast / ms['step fast math']:>6.0%} {plain:>11.1f} "
              f"{plain / ms['step MLX ops']:>6.0%}")
    print(f"{'whole micro-step':<46} {ms['step fast math']:>13.1f} {'':>6} {ms['step MLX ops']:>11.1f}")
    print(f"tokens/s: fast math {L / ms['step fast math'] * 1000:.0f}, MLX ops {L / ms['step MLX ops'] * 1000:.0f}")


if __name__ == "__main__":
    main()
