"""The whole pipeline on the embedded default: build the tiny model, train surgical LoRA on
the bundled data with configs/tiny.json, and compare base and adapted answers."""

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from .config import load_config, preset_path
from .data import read_records, sample_path, to_messages
from .generate import answer, load_for_generation, prompt_format_for
from .pipeline import RunResult, train_run
from .rundir import RunDir
from .tiny import QUICKSTART_SHAPE, build_tiny_model

TINY_MODEL_DIR = "models/tiny-llama"


@dataclass
class QuickstartResult:
    run: RunResult
    prompt: str
    base_answer: str
    adapted_answer: str
    last_epoch_loss: float  # mean over the last epoch's updates: one update's loss is noisy


def ensure_tiny_model(model_dir: str | Path, log: Callable[[str], None] = print) -> Path:
    model_dir = Path(model_dir)
    if (model_dir / "config.json").exists():
        log(f"using the tiny model in {model_dir}")
        return model_dir
    log(f"building a tiny random Llama model and SentencePiece tokenizer in {model_dir}")
    return build_tiny_model(model_dir, QUICKSTART_SHAPE)


def run_quickstart(out_dir: str = "adapters", model_dir: str = TINY_MODEL_DIR, epochs: Optional[int] = None,
                   progress: bool = True, log: Callable[[str], None] = print) -> QuickstartResult:
    model_path = ensure_tiny_model(model_dir, log)
    config = load_config(preset_path("tiny"))
    config.model.path = str(model_path)
    config.output.dir = out_dir
    if epochs is not None:
        config.training.epochs = epochs
    run = train_run(config, config_name="quickstart", progress=progress, log=log)
    losses = [r["loss"] for r in RunDir(run.run_dir).metric_rows() if "loss" in r]
    per_epoch = max(1, len(losses) // (config.training.epochs or 1))
    last_epoch_loss = sum(losses[-per_epoch:]) / len(losses[-per_epoch:])

    held_out = read_records(sample_path("test"))[0]
    prompt = to_messages(held_out)[0][-2]["content"]
    base = load_for_generation(str(model_path))
    base_answer = answer(base, prompt_format_for(base), prompt, max_tokens=64)
    adapted = load_for_generation(str(model_path), run.run_dir)
    adapted_answer = answer(adapted, prompt_format_for(adapted, run.run_dir), prompt, max_tokens=64)
    return QuickstartResult(run, prompt, base_answer, adapted_answer, last_epoch_loss)
