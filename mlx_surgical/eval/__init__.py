"""The surgical report: what an adapter learned, what it disturbed, and whether its code works.

`evaluate_adapter` compares the base model and base + adapter on the same held-out examples
and writes eval.json and eval.md. One module per concern: `examples` (concepts and tests),
`heldout` (learned), `disturbance` (reference-text loss and KL to the base), `works` with
`sandbox`/`confine` (running generated code) and `passk`, `report` (the outputs). Both sides
of the comparison come from one set of weights (`surgery.base_only`).
"""

import time
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable, Optional

from ..adapter import AdapterConfig
from ..config import DataConfig, EvalConfig, RunConfig, TrainingConfig, eval_problems, resolve_data_path
from ..console import counted, working
from ..data import Record, read_records, split_records
from ..errors import UserError
from ..files import make_directory
from ..generate import complete, prompt_format_for
from ..model import LoadedModel
from ..prompt import encode_records
from ..rundir import EVAL_JSON, EVAL_MD, RunDir, load_run_config, now, require_directory
from ..surgery import base_only, load_with_adapter
from .disturbance import example_kl, neutral_records, reference_records
from .examples import EvalExample, read_examples
from .heldout import combine, example_losses
from .passk import mean_pass_at_k
from .report import pass_k_values, summary, write_report
from .sandbox import Sandbox
from .works import ProblemResult, run_problems


def _run_config(adapter_dir: Path) -> Optional[RunConfig]:
    """The run's resolved config, or None for an adapter directory that is not a run."""
    return load_run_config(adapter_dir) if RunDir(adapter_dir).config.exists() else None


def held_out_records(adapter_dir: Path, data: Optional[str] = None, relative_to: Optional[Path] = None,
                     where: str = "--data", instead: str = "--data FILE") -> tuple[list[Record], str]:
    """The examples an evaluation scores, and where they came from: the file `data` (a relative
    name is looked up from `relative_to`, by default the working directory), else the run's
    validation split. `where` names the setting in errors, `instead` what to give instead."""
    if data is not None:
        records = read_records(resolve_data_path(data, relative_to or Path.cwd(), where), where)
        if not records:
            raise UserError(f"{where}: {data}: no examples to evaluate on")
        return records, str(data)
    run = _run_config(adapter_dir)
    if run is None:
        raise UserError(f"{adapter_dir}: not a run directory, so there is no validation split to evaluate on; "
                        f"give held-out examples with {instead}")
    records = split_records(run.data, "valid")
    if not records:
        raise UserError(f"{adapter_dir}: the run has no validation split (data.valid); give held-out examples "
                        f"with {instead}")
    return records, "the run's validation split"


def _learned(per_example: dict[str, list], indices) -> Optional[dict]:
    """Base and adapted loss over the chosen examples; gain = base loss - adapted loss."""
    base, adapted = combine(per_example["base"], indices), combine(per_example["adapted"], indices)
    if not base.tokens:
        return None
    return {"base": base.to_dict(), "adapted": adapted.to_dict(), "gain": base.loss - adapted.loss}


def _both_sides(model, measure: Callable) -> dict:
    """measure() with the adapter, then with the base model."""
    adapted = measure()
    with base_only(model):
        base = measure()
    return {"base": base, "adapted": adapted}


def _disturbed(model, encode, max_length: int) -> dict:
    references = reference_records()
    reference = encode(references)
    kinds = defaultdict(list)
    kind_of = {r.origin: r.fields["concept"] for r in references}
    for i, sample in enumerate(reference.samples):
        kinds[kind_of[sample.origin]].append(i)
    losses = _both_sides(model, lambda: example_losses(model, reference.samples, max_length))
    total = _learned(losses, range(len(reference.samples)))
    kl = example_kl(model, encode(neutral_records(), mask_prompt=True).samples)
    positions = sum(n for _, n in kl)
    return {"reference": {"base": total["base"], "adapted": total["adapted"], "change": -total["gain"],
                          "passages": len(reference.samples),
                          "by_kind": {kind: _learned(losses, indices) for kind, indices in kinds.items()}},
            "kl": {"mean": sum(s for s, _ in kl) / positions, "positions": positions, "prompts": len(kl)}}


def _pass_rates(results: dict[str, list[ProblemResult]], samples: int) -> dict:
    return {side: {f"pass@{k}": mean_pass_at_k([(r.samples, r.passed) for r in rs], k) for k in pass_k_values(samples)}
            for side, rs in results.items()}


def _by_concept(examples: list[EvalExample], held_out, per_example: dict, results: Optional[dict],
                samples: int) -> dict:
    sample_index = {s.origin: i for i, s in enumerate(held_out.samples)}
    origins = defaultdict(list)
    for example in examples:
        for concept in example.concepts:
            origins[concept].append(example.origin)
    figures = {}
    for concept, chosen in origins.items():
        problems = {side: [r for r in rs if r.origin in chosen] for side, rs in (results or {}).items()}
        figures[concept] = {"examples": len(chosen),
                            "learned": _learned(per_example, [sample_index[o] for o in chosen if o in sample_index]),
                            "works": _pass_rates(problems, samples) if problems.get("adapted") else None}
    return figures


def evaluate_adapter(adapter_dir: str | Path, model: Optional[str] = None, data: Optional[str] = None,
                     overrides: Optional[dict] = None, out_dir: Optional[str | Path] = None,
                     loaded: Optional[LoadedModel] = None, log: Callable[[str], None] = print,
                     progress: bool = False) -> dict:
    """Evaluate base vs base + adapter and write eval.json and eval.md (into out_dir, by default
    the adapter directory); returns the report. adapter_dir is a run directory (its base model,
    validation split, data settings and eval section are used) or any mlx-lm adapter directory
    with `model` naming its base. `data` is a held-out file in any accepted format, `overrides`
    eval settings over the run's (or the defaults), `loaded` the model with this adapter
    already attached (as training leaves it). With `progress` the long steps show a spinner (or
    a line as each starts and ends) on stderr instead of going to `log`."""
    started = time.perf_counter()
    adapter_dir = require_directory(adapter_dir)
    run = _run_config(adapter_dir)
    try:
        settings = replace(run.eval if run else EvalConfig(), **(overrides or {}))
    except TypeError as e:
        raise UserError(f"eval settings: {e}") from None
    if eval_problems(settings):
        raise UserError(*eval_problems(settings))
    if model is None and run is None:
        raise UserError(f"{adapter_dir}: not a run directory; name the base model with --model")
    model_path = model or AdapterConfig.read(adapter_dir).local_base_model or run.model.path
    records, source = held_out_records(adapter_dir, data)
    written = make_directory(out_dir) if out_dir is not None else adapter_dir  # before the minutes of work
    examples = read_examples(records, settings.samples)
    problems = [e for e in examples if e.tests is not None]
    samples = settings.samples if settings.samples is not None else (1 if problems else 0)
    sandbox = Sandbox(settings.timeout_seconds, settings.memory_mb) if samples and problems else None

    def stage(message: str):
        """A step that can take a minute: a spinner with its seconds (progress), else one log line."""
        return working(message) if progress else nullcontext(log(message))

    if loaded is None:
        with stage(f"loading {model_path} with the adapter in {adapter_dir}"):
            loaded = load_with_adapter(model_path, adapter_dir, where="--model" if model else "model.path",
                                       dtype=run.model.dtype if run else "auto")
    loaded.model.eval()  # no LoRA dropout
    fmt = prompt_format_for(loaded, adapter_dir)
    if run:
        max_length, mask_prompt, overlength = run.training.max_seq_length, run.data.mask_prompt, run.data.overlength
    else:  # an exported adapter: cut and mask examples as its training recorded
        recorded = AdapterConfig.read(adapter_dir).prompt
        max_length = recorded.max_seq_length or TrainingConfig().max_seq_length
        mask_prompt, overlength = recorded.mask_prompt, DataConfig().overlength

    def encode(rows, mask_prompt=mask_prompt):
        return encode_records(rows, fmt, max_length, overlength, mask_prompt)

    held_out = encode(records)
    if not held_out.samples:
        raise UserError(f"{source}: no example is left to score after length checks; raise training.max_seq_length")
    with stage(f"held-out loss on {counted(len(held_out.samples), 'example')}"):
        per_example = _both_sides(loaded.model, lambda: example_losses(loaded.model, held_out.samples, max_length))
    with stage("reference-text loss, and KL to the base model on neutral prompts"):
        disturbed = _disturbed(loaded.model, encode, max_length)

    results = None
    if sandbox:
        with stage(f"running {counted(samples, 'candidate')} for each of {counted(len(problems), 'problem')} "
                   f"with tests (sandbox: {sandbox.isolation.mode})"):
            results = _both_sides(loaded.model, lambda: run_problems(
                loaded, fmt, problems, samples, settings.temperature, settings.max_tokens, settings.seed, sandbox))

    shown = [e for e in examples if e.has_answer][:settings.generations]
    with stage(f"side-by-side answers to {counted(len(shown), 'held-out prompt')}"):
        answers = _both_sides(loaded.model, lambda: [
            complete(loaded, fmt, e.prompt_messages, settings.max_tokens) for e in shown])

    report = {
        "version": 1,
        "created": now(),
        "adapter": str(adapter_dir),
        "base_model": model_path,
        "data": {"source": source, "examples": len(records), "scored": len(held_out.samples),
                 "truncated": held_out.truncated, "skipped": held_out.skipped},
        "settings": asdict(settings),
        "prompt_format": fmt.style,
        "learned": _learned(per_example, range(len(held_out.samples))),
        "disturbed": disturbed,
        "works": None if results is None else {
            "problems": len(problems), "samples": samples, **_pass_rates(results, samples),
            "problems_detail": {side: [r.to_dict() for r in rs] for side, rs in results.items()}},
        "concepts": _by_concept(examples, held_out, per_example, results, samples),
        "generations": [{"origin": e.origin, "prompt": e.prompt_messages[-1]["content"], "base": b, "adapted": a}
                        for e, b, a in zip(shown, answers["base"], answers["adapted"])],
        "sandbox": None if sandbox is None else {
            "isolation": sandbox.isolation.mode, "enforced": sandbox.isolation.enforced(),
            "not_enforced": sandbox.isolation.not_enforced()},
    }
    report["summary"] = summary(report)
    report["seconds"] = round(time.perf_counter() - started, 1)
    write_report(written, report)
    log(f"wrote {written / EVAL_JSON} and {written / EVAL_MD}")
    return report
