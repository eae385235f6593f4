"""The whole pipeline on the embedded default: build the tiny model, train surgical LoRA on
the bundled data with configs/tiny.json, and compare base and adapted answers."""

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from .backend import slow_path_warnings
from .callbacks import ProgressStyle
from .config import load_config, preset_path
from .console import command_line
from .data import read_records, sample_path, to_messages
from .generate import answer, load_for_generation, prompt_format_for
from .pipeline import RunResult, train_run
from .rundir import RunDir
from .shape import ModelShape
from .tiny import QUICKSTART_SHAPE, build_tiny_model

TINY_MODEL_DIR = "models/tiny-llama"
# A prompt in the shape of the bundled training pairs, for the commands the quickstart suggests.
TRY_PROMPT = "Write a Python function `square` that returns a number squared."


@dataclass
class QuickstartResult:
    run: RunResult
    model_dir: Path
    prompt: str
    base_answer: str
    adapted_answer: str
    last_epoch_loss: float  # mean over the last epoch's updates: one update's loss is noisy
    seconds: float  # the whole quickstart, building the model included

    def suggested_commands(self) -> list[list[str]]:
        """What to run next, as argument lists (report_lines quotes them for the shell)."""
        run_dir = self.run.run_dir
        return [["mlx-surgical", "generate", "--model", str(self.model_dir), "--adapter", str(run_dir), TRY_PROMPT],
                # The tiny tokenizer has no chat template, so mlx-lm needs CodeLlama's [INST] form.
                ["mlx_lm.generate", "--model", str(self.model_dir), "--adapter-path", str(run_dir),
                 "--prompt", f"[INST] {TRY_PROMPT} [/INST]"],
                ["mlx-surgical", "export", str(run_dir), "--format", "peft"]]

    def report_lines(self) -> list[str]:
        run = self.run
        lines = ["", f"training loss {run.first_loss:.3f} at the first update -> {self.last_epoch_loss:.3f} over the "
                 f"last epoch ({self.last_epoch_loss / run.first_loss:.0%})"
                 + (f", validation loss {run.final_val_loss:.3f}" if run.final_val_loss is not None else "")]
        lines += ["", "held-out prompt:", *indented(self.prompt)]
        lines += ["", "base model:", *indented(self.base_answer)]
        lines += ["", "base + adapter:", *indented(self.adapted_answer)]
        lines += ["", f"wrote {run.run_dir}/:"]
        lines += [f"  {p.name}{'/' if p.is_dir() else ''}" for p in sorted(run.run_dir.iterdir())]
        lines += ["", "use it:", *(f"  {command_line(*argv)}" for argv in self.suggested_commands())]
        minutes, seconds = divmod(round(self.seconds), 60)
        lines += ["", f"the quickstart took {minutes} min {seconds:02d} s on this machine"]
        return lines


def indented(text: str) -> list[str]:
    """Model output as it reads, each line indented; an empty answer says so."""
    return [f"  {line}" for line in text.splitlines()] if text.strip() else ["  (no text)"]


def ensure_tiny_model(model_dir: str | Path, log: Callable[[str], None] = print) -> Path:
    model_dir = Path(model_dir)
    if (model_dir / "config.json").exists():
        log(f"using the tiny model in {model_dir}")
        return model_dir
    log(f"building a tiny random Llama model and SentencePiece tokenizer in {model_dir}")
    return build_tiny_model(model_dir, QUICKSTART_SHAPE)


def run_quickstart(out_dir: str = "adapters", model_dir: str = TINY_MODEL_DIR, epochs: Optional[int] = None,
                   progress: ProgressStyle | bool = "auto", log: Callable[[str], None] = print) -> QuickstartResult:
    start = time.perf_counter()
    config = load_config(preset_path("tiny"))
    config.model.path = str(model_dir)
    config.output.dir = out_dir
    if epochs is not None:
        config.training.epochs = epochs
    for warning in slow_path_warnings(config, ModelShape.from_config(QUICKSTART_SHAPE.hf_config())):
        log(f"warning: {warning}")
    model_path = ensure_tiny_model(model_dir, log)
    run = train_run(config, config_name="quickstart", progress=progress, log=log, speed_warnings=False)
    losses = [r["loss"] for r in RunDir(run.run_dir).metric_rows() if "loss" in r]
    per_epoch = max(1, len(losses) // (config.training.epochs or 1))
    last_epoch_loss = sum(losses[-per_epoch:]) / len(losses[-per_epoch:])

    held_out = read_records(sample_path("test"))[0]
    prompt = to_messages(held_out)[0][-2]["content"]
    base = load_for_generation(str(model_path))
    base_answer = answer(base, prompt_format_for(base), prompt, max_tokens=64)
    adapted = load_for_generation(str(model_path), run.run_dir)
    adapted_answer = answer(adapted, prompt_format_for(adapted, run.run_dir), prompt, max_tokens=64)
    return QuickstartResult(run, model_path, prompt, base_answer, adapted_answer, last_epoch_loss,
                            time.perf_counter() - start)
