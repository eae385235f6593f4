"""Plan a run before it starts: trainable parameters, adapter size, memory, schedule, time.

Everything here is computed from the model's config.json (or the built-in shapes of
CodeLlama, for planning before a download) and the run config; no weights are loaded,
except for the optional time probe. The schedule is training's own (`train.schedule_for`),
and tests hold the trainable count to what surgery attaches, so the plan's numbers are the
run's numbers.
"""

import copy
import sys
import tempfile
import textwrap
from dataclasses import replace
from itertools import zip_longest
from typing import Callable, Optional

from .adapter import adapted_layer_count
from .backend import machine_memory_gb, on_cpu_backend, slow_path_warnings, training_dtype
from .batches import padded_length
from .config import ConvertConfig, LoraConfig, RunConfig, TrainingConfig, per_rank_batch
from .console import counted, working
from .data import split_records
from .errors import UserError
from .loss import loss_chunk_rows
from .model import how_to_create, is_local, load_tokenizer, looks_like_local_path, model_shape
from .pipeline import encode_split, train_run
from .prompt import PromptFormat
from .rundir import RunDir
from .shape import ModelShape
from .train import schedule_for
from .tuning import pairing_options

# Hugging Face config.json values of the CodeLlama family, for planning before a download.
KNOWN_SHAPES = {
    "codellama-7b": ModelShape("llama", 4096, 11008, 32, 32, 32, 32016, 128),
    "codellama-13b": ModelShape("llama", 5120, 13824, 40, 40, 40, 32016, 128),
    "codellama-34b": ModelShape("llama", 8192, 22016, 48, 64, 8, 32000, 128),
}


def lora_parameter_count(shape: ModelShape, lora: LoraConfig) -> int:
    """rank x (in + out) for every adapted projection: exactly what training reports."""
    per_layer = sum(lora.rank * sum(shape.projection_dims(name)) for name in lora.target_modules)
    return per_layer * adapted_layer_count(lora, shape.num_layers)


def known_shape(path: str) -> Optional[ModelShape]:
    key = path.lower().replace("_", "-")
    for name, shape in KNOWN_SHAPES.items():
        if name in key:
            return shape
    return None


def resolve_shape(config: RunConfig) -> tuple[ModelShape, str]:
    """The model's shape and where it came from: its config.json when available locally,
    else the built-in CodeLlama table (assuming the quantization the preset asks for)."""
    try:
        return model_shape(config.model.path, config.model.revision, download=False), "config.json"
    except UserError:
        shape = known_shape(config.model.path)
        if shape is None:
            path = config.model.path
            how = how_to_create(path) if looks_like_local_path(path) else "training downloads it; plan after that"
            raise UserError(f"model.path: {path} is not available locally and is not a known shape "
                            f"({', '.join(KNOWN_SHAPES)}); {how}") from None
        quant_bits = 4 if "4bit" in config.model.path.lower() else None
        return replace(shape, quant_bits=quant_bits, quant_group_size=ConvertConfig.group_size if quant_bits else None), "built-in table"


GB = 1e9


def weight_bytes(shape: ModelShape, dtype_bytes: int = 2) -> int:
    """Base weights as stored: quantized matrices take bits/8 per weight plus a float16 scale
    and bias per group (mlx-lm quantizes the embedding and output head too); norms stay in
    dtype."""
    norms = (2 * shape.num_layers + 1) * shape.hidden_size
    matrices = shape.parameter_count - norms
    if shape.quant_bits:
        per_weight = shape.quant_bits / 8 + 4 / shape.quant_group_size
        return int(matrices * per_weight + norms * dtype_bytes)
    return int((matrices + norms) * dtype_bytes)


def activation_bytes(shape: ModelShape, tokens_per_batch: int, seq_len: int, batch: int, dtype_bytes: int,
                     checkpointing: bool, cpu_math: bool) -> int:
    """What the backward pass keeps: per layer and token, the inputs and outputs of the norms,
    projections and SwiGLU (about 10 hidden-sized and 4 intermediate-sized vectors), plus the
    attention probabilities (heads x L x L); and one chunk of float32 logits with its
    exponentials and probabilities (see loss.py). With checkpointing only each layer's input is
    kept, plus one layer recomputed. MLX's CPU path (forward.py) keeps one float32 copy of the
    probabilities, but its exp briefly holds about six score-sized arrays for the layer at hand."""
    h, i = shape.hidden_size, shape.intermediate_size
    per_token_layer = (10 * h + 4 * i) * dtype_bytes
    scores = shape.num_heads * seq_len * seq_len * batch
    attention = scores * 4 if cpu_math else 2 * scores * dtype_bytes
    transient = 6 * scores * 4 if cpu_math else 0
    per_layer = tokens_per_batch * per_token_layer + attention
    logits = 5 * min(tokens_per_batch, loss_chunk_rows(shape.vocab_size)) * shape.vocab_size * 4
    if checkpointing:
        return int(shape.num_layers * tokens_per_batch * h * dtype_bytes + per_layer + logits + transient)
    return int(shape.num_layers * per_layer + logits + transient)


def memory_estimate(shape: ModelShape, lora_params: int, training: TrainingConfig, dtype_bytes: int,
                    seq_len: Optional[int] = None, ranks: int = 1) -> dict:
    """Peak training memory on this machine's MLX device; activations for batches of `seq_len`
    tokens (default: the worst case, max_seq_length)."""
    cpu_math = on_cpu_backend()  # the fast math keeps more: plan for it
    # Where micro-batches may run in pairs (train.py, MLX's CPU backend), two hold activations at once.
    pairings = pairing_options(training.cpu_paired_micro_batches, training.grad_accumulation_steps, ranks)
    at_once = 2 if cpu_math and True in pairings else 1
    seq_len = seq_len or training.max_seq_length
    tokens = training.batch_size * seq_len
    base = weight_bytes(shape, dtype_bytes)
    lora = 4 * lora_params  # float32
    grads = 2 * 4 * lora_params  # this micro-batch's and the accumulated gradients
    adam = 2 * 4 * lora_params  # first and second moments
    acts = at_once * activation_bytes(shape, tokens, seq_len, training.batch_size, dtype_bytes, False, cpu_math)
    acts_ckpt = at_once * activation_bytes(shape, tokens, seq_len, training.batch_size, dtype_bytes, True, cpu_math)
    chosen = acts_ckpt if training.grad_checkpoint else acts
    return {
        "base_weights_gb": base / GB, "lora_weights_gb": lora / GB, "gradients_gb": grads / GB,
        "adamw_state_gb": adam / GB, "activations_gb": acts / GB, "activations_checkpointed_gb": acts_ckpt / GB,
        "grad_checkpoint": training.grad_checkpoint, "sequence_length": seq_len, "micro_batches_at_once": at_once,
        "total_gb": (base + lora + grads + adam + chosen) / GB,
    }


def count_examples(config: RunConfig) -> tuple[int, Optional[int], Optional[int], str]:
    """(examples, tokens, longest example, how they were counted): token counts only when the
    tokenizer is local."""
    records = split_records(config.data, "train")
    if is_local(config.model.path):
        fmt = PromptFormat.for_data(load_tokenizer(config.model.path, config.model.revision), config.data)
        encoded = encode_split(config, fmt, "train", records)
        longest = max((len(s.ids) for s in encoded.samples), default=None)
        return len(encoded.samples), encoded.tokens, longest, "tokenized"
    return len(records), None, None, "counted; the tokenizer is not local, so lengths are unchecked"


PROBE_UPDATES = 4  # the first pays for compilation and is not counted


def _stderr(line: str) -> None:
    sys.stderr.write(line + "\n")


def plan_run(config: RunConfig, probe: bool = True, ranks: int = 1, log: Callable[[str], None] = _stderr) -> dict:
    """The plan for `config`; with ranks > 1, for data-parallel training under mlx.launch. A
    slow path this machine could avoid is logged before the timing probe (and listed under
    "warnings"); the probe shows that it is running."""
    t = config.training
    per_rank = per_rank_batch(t, ranks, "--ranks")
    shape, shape_source = resolve_shape(config)
    lora_params = lora_parameter_count(shape, config.lora)
    examples, tokens, longest, how_counted = count_examples(config)
    schedule = schedule_for(examples, config.training)
    dtype_bytes = 4 if training_dtype(config.model.dtype) == "float32" else 2
    # Padding rounds a batch up to a bucket (batches.bucket).
    seq_len = padded_length(longest, config.training.max_seq_length) if longest else None
    # Memory is per rank: each holds the whole model and its share of the batch.
    memory = memory_estimate(shape, lora_params, replace(t, batch_size=per_rank), dtype_bytes, seq_len, ranks=ranks)
    memory["machine_gb"] = machine_memory_gb()
    memory["fits"] = memory["machine_gb"] is None or memory["total_gb"] <= memory["machine_gb"]
    warnings = slow_path_warnings(config, shape)
    for warning in warnings:
        log(f"warning: {warning}")
    plan = {
        "model": {"path": config.model.path, "shape": shape.describe(), "from": shape_source,
                  "parameters": shape.parameter_count},
        "lora": {"rank": config.lora.rank, "alpha": config.lora.alpha, "scale": config.lora.scale,
                 "target_modules": config.lora.target_modules,
                 "layers": adapted_layer_count(config.lora, shape.num_layers)},
        "trainable_parameters": lora_params,
        "trainable_share": lora_params / shape.parameter_count,
        "adapter_size_bytes": {"float32": 4 * lora_params, "float16": 2 * lora_params},
        "memory": memory,
        "batch": {"global": t.batch_size, "ranks": ranks, "per_rank": per_rank,
                  "accumulation_steps": t.grad_accumulation_steps,
                  "examples_per_update": t.batch_size * t.grad_accumulation_steps},
        "schedule": {**schedule.to_dict(), "examples_counted": how_counted, "train_tokens": tokens,
                     "warmup_share": schedule.warmup_updates / schedule.updates if schedule.updates else 0.0},
        "time": {"seconds_per_update": None, "total_seconds": None, "note": ""},
        "warnings": warnings,
    }
    if not is_local(config.model.path) or not tokens:
        plan["time"]["note"] = "unknown: the model is not local, so no probe was run"
    elif not probe:
        plan["time"]["note"] = "not measured: the timing probe was skipped (--no-probe)"
    elif not memory["fits"]:
        plan["time"]["note"] = "not measured: the run does not fit this machine's memory"
    else:
        with working(f"timing {counted(PROBE_UPDATES, 'update')} on this machine"):
            seconds = probe_seconds_per_update(config)
        plan["time"] = {"seconds_per_update": seconds, "total_seconds": seconds * schedule.updates,
                        "note": "measured by a short probe on this machine"}
    return plan


def probe_seconds_per_update(config: RunConfig) -> float:
    """Time a few real updates (after one warm-up update that pays for compilation) in a
    throwaway run directory."""
    probe = copy.deepcopy(config)
    probe.training.epochs, probe.training.iters = None, PROBE_UPDATES
    probe.training.save_every = probe.training.eval_every = 10 ** 9
    probe.eval.enabled = False
    probe.data.valid, probe.data.valid_examples = None, None
    with tempfile.TemporaryDirectory() as tmp:
        probe.output.dir, probe.output.name = tmp, "probe"
        result = train_run(probe, progress=False, log=lambda _: None, speed_warnings=False)
        rows = RunDir(result.run_dir).metric_rows()[1:]
    return sum(r["seconds"] for r in rows) / len(rows)


def does_not_fit_advice(plan: dict) -> str:
    """What would shrink a run that does not fit, of what the config does not do already."""
    advice = [] if plan["memory"]["grad_checkpoint"] else ["turn on training.grad_checkpoint"]
    advice.append("lower training.max_seq_length or training.batch_size")
    if "-bit" not in plan["model"]["shape"]:
        advice.append("use a 4-bit base (mlx-surgical convert)")
    return "; ".join(advice)


COMPARE_COLUMN = 44  # with the labels, two columns of a comparison fit 120 characters


def format_plan(plan: dict, other: Optional[dict] = None, names: tuple[str, str] = ("", "")) -> str:
    """Human-readable plan; with `other`, the two side by side."""
    def rows(p: dict) -> list[tuple[str, str]]:
        m, s, t = p["memory"], p["schedule"], p["time"]
        worst_case = "" if s["examples_counted"] == "tokenized" else \
            " with every example at max_seq_length; planned again from the real lengths once the tokenizer is local"
        machine = f"{m['machine_gb']:.1f} GB" if m["machine_gb"] else "unknown"
        return [
            ("model", f"{p['model']['path']} ({p['model']['from']})"),
            ("shape", p["model"]["shape"]),
            ("LoRA", f"rank {p['lora']['rank']}, alpha {p['lora']['alpha']:g} (scale {p['lora']['scale']:g}), "
                     f"{'/'.join(m.removesuffix('_proj') for m in p['lora']['target_modules'])} projections, "
                     f"{p['lora']['layers']} layers"),
            ("trainable parameters", f"{p['trainable_parameters']:,} ({100 * p['trainable_share']:.3f}% of "
                                     f"{p['model']['parameters']:,})"),
            ("adapter size", f"{p['adapter_size_bytes']['float32'] / 1e6:.1f} MB float32, "
                             f"{p['adapter_size_bytes']['float16'] / 1e6:.1f} MB float16"),
            ("memory: base weights", f"{m['base_weights_gb']:.2f} GB"),
            ("memory: LoRA + grads + AdamW", f"{(m['lora_weights_gb'] + m['gradients_gb'] + m['adamw_state_gb']):.3f} GB"),
            ("memory: activations", f"{m['activations_gb']:.2f} GB at {m['sequence_length']} tokens "
                                    + ("x 2 micro-batches at once, if pairing them measures faster "
                                       if m["micro_batches_at_once"] == 2 else "")
                                    + ("(the longest example) " if s["examples_counted"] == "tokenized" else
                                       "(training.max_seq_length: the longest example is measured once the "
                                       "tokenizer is local) ")
                                    + f"({m['activations_checkpointed_gb']:.2f} GB with grad_checkpoint)"),
            ("memory: total", f"{m['total_gb']:.2f} GB of {machine}" + ("" if m["fits"] else
                                                                         f" (DOES NOT FIT{worst_case}: "
                                                                         f"{does_not_fit_advice(p)})")),
            ("examples", f"{s['examples']} ({s['examples_counted']})"),
            ("batch", f"{p['batch']['global']} x {p['batch']['accumulation_steps']} accumulation = "
                      f"{p['batch']['examples_per_update']} examples per update"
                      + (f"; {p['batch']['per_rank']} per rank on {p['batch']['ranks']} ranks"
                         if p['batch']['ranks'] > 1 else "")),
            ("schedule", f"{counted(s['epochs'], 'epoch')} x "
                         f"{counted(s['micro_batches_per_epoch'], 'micro-batch', 'micro-batches')} = "
                         f"{counted(s['micro_batches'], 'micro-batch', 'micro-batches')}"),
            ("optimizer updates", f"{s['updates']:,} ({s['warmup_updates']:,} warmup, {100 * s['warmup_share']:.0f}%)"),
            ("time", f"{t['total_seconds'] / 60:.1f} min ({t['seconds_per_update']:.2f} s/update, {t['note']})"
                     if t["total_seconds"] is not None else t["note"]),
        ]

    left = rows(plan)
    if other is None:
        width = max(len(k) for k, _ in left)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in left)
    right = dict(rows(other))
    width = max(len(k) for k, _ in left)
    lines = [f"{'':<{width}}  {names[0]:<{COMPARE_COLUMN}}  {names[1]}"]
    for key, value in left:  # each value wrapped in its column, so the table fits a terminal
        wrapped = zip_longest(*(textwrap.wrap(v, COMPARE_COLUMN, break_on_hyphens=False) or [""]
                                for v in (value, right[key])), fillvalue="")
        lines += [f"{key if i == 0 else '':<{width}}  {a:<{COMPARE_COLUMN}}  {b}".rstrip()
                  for i, (a, b) in enumerate(wrapped)]
    return "\n".join(lines)
