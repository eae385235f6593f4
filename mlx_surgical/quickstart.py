"""The whole pipeline on the embedded default: build the tiny model (or, with `real`, fetch
SmolLM2-135M-Instruct's GGUF and convert it to float32), train surgical LoRA on the bundled data
with configs/tiny.json (configs/smollm2.json), and compare base and adapted answers and
held-out losses."""

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from .backend import preloaded_openblas, slow_path_warnings
from .callbacks import ProgressStyle
from .config import OutputConfig, RunConfig, load_config, preset_path
from .console import command_line, printable
from .convert import convert_model
from .convert.gguf import tokenizer_reader_problem
from .convert.smollm2 import fetch_smollm2
from .data import read_records, sample_path, to_messages
from .errors import UserError
from .eval.heldout import combine, example_losses
from .generate import compare_answers
from .model import model_shape
from .pipeline import RunResult, encode_split, train_run
from .prompt import PromptFormat
from .rundir import RunDir
from .shape import ModelShape
from .surgery import load_with_adapter
from .tiny import QUICKSTART_SHAPE, build_tiny_model

# A prompt in the shape of the bundled training pairs, for the commands the quickstart suggests.
TRY_PROMPT = "Write a Python function `square` that returns a number squared."


@dataclass
class QuickstartResult:
    run: RunResult
    model_dir: Path
    prompt: str
    base_answer: str
    adapted_answer: str
    recent_loss: float  # mean over the last epoch's updates (one update's loss is noisy)
    recent_updates: int  # a run counted in iters: its last quarter
    base_val_loss: Optional[float]  # the base model's held-out loss; run.final_val_loss is the adapted one
    seconds: float  # the whole quickstart, building the model included
    real: bool = False

    def suggested_commands(self) -> list[list[str]]:
        """What to run next, as argument lists (report_lines quotes them for the shell)."""
        run_dir = self.run.run_dir
        # The tiny tokenizer has no chat template, so mlx-lm needs CodeLlama's [INST] form;
        # SmolLM2's ChatML template is applied by mlx-lm itself.
        prompt = TRY_PROMPT if self.real else f"[INST] {TRY_PROMPT} [/INST]"
        # mlx-lm's own commands do not preload OpenBLAS as mlx-surgical does: without it, ~14x slower on Linux.
        library = preloaded_openblas()
        fast_blas = ["env", f"LD_PRELOAD={library}"] if library else []
        return [["mlx-surgical", "generate", "--model", str(self.model_dir), "--adapter", str(run_dir), TRY_PROMPT],
                [*fast_blas, "mlx_lm.generate", "--model", str(self.model_dir), "--adapter-path", str(run_dir),
                 "--prompt", prompt],
                ["mlx-surgical", "export", str(run_dir), "--format", "gguf" if self.real else "peft"]]

    def report_lines(self) -> list[str]:
        run = self.run
        lines = ["", f"training loss {run.first_loss:.3f} at the first update -> {self.recent_loss:.3f} over the "
                 f"last {self.recent_updates} updates ({'down' if self.recent_loss <= run.first_loss else 'up'} "
                 f"{abs(1 - self.recent_loss / run.first_loss):.0%})"]
        if self.base_val_loss is not None and run.final_val_loss is not None:
            lines.append(f"held-out loss: base {self.base_val_loss:.3f} -> adapted {run.final_val_loss:.3f}")
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
    return [f"  {line}" for line in printable(text).splitlines()] if text.strip() else ["  (no text)"]


def ensure_tiny_model(model_dir: str | Path, log: Callable[[str], None] = print) -> Path:
    model_dir = Path(model_dir)
    if (model_dir / "config.json").exists():
        log(f"using the tiny model in {model_dir}")
        return model_dir
    log(f"building a tiny random Llama model and SentencePiece tokenizer in {model_dir}")
    return build_tiny_model(model_dir, QUICKSTART_SHAPE)


def ensure_real_model(model_dir: str | Path, log: Callable[[str], None] = print) -> Path:
    """SmolLM2-135M-Instruct in float32 MLX (what trains fast on a CPU), converted once from its GGUF."""
    model_dir = Path(model_dir)
    if (model_dir / "config.json").exists():
        log(f"using SmolLM2-135M-Instruct in {model_dir}")
        return model_dir
    if problem := tokenizer_reader_problem("SmolLM2-135M-Instruct.Q4_1.gguf"):  # before a 93 MB download
        raise UserError(problem)
    gguf_path = fetch_smollm2(log=log)
    return convert_model(str(gguf_path), model_dir, bits=None, dtype="float32", log=log)


def held_out_loss(config: RunConfig) -> Optional[float]:
    """The base model's loss on the validation split, prompted as training will prompt it."""
    loaded = load_with_adapter(config.model.path, dtype=config.model.dtype)
    samples = encode_split(config, PromptFormat.for_data(loaded.tokenizer, config.data), "valid").samples
    if not samples:
        return None
    return combine(example_losses(loaded.model, samples, config.training.max_seq_length), range(len(samples))).loss


def run_quickstart(out_dir: str = OutputConfig.dir, model_dir: Optional[str] = None, epochs: Optional[int] = None,
                   progress: ProgressStyle | bool = "auto", log: Callable[[str], None] = print,
                   real: bool = False, started: Optional[float] = None) -> QuickstartResult:
    """The demo end to end; `started` (time.perf_counter) counts from an earlier moment, such as
    before the command imported MLX and transformers (about 20 s on a cold machine)."""
    start = time.perf_counter() if started is None else started
    config = load_config(preset_path("smollm2" if real else "tiny"))
    model_dir = model_dir or config.model.path
    config.model.path = str(model_dir)
    config.output.dir = out_dir
    if epochs is not None:
        config.training.epochs, config.training.iters = epochs, None
    if real:
        model_path = ensure_real_model(model_dir, log)
        shape = model_shape(str(model_path))
    else:
        shape = ModelShape.from_config(QUICKSTART_SHAPE.hf_config())
    for warning in slow_path_warnings(config, shape):
        log(f"warning: {warning}")
    if not real:
        model_path = ensure_tiny_model(model_dir, log)
    base_val_loss = held_out_loss(config)
    run = train_run(config, config_name="quickstart-real" if real else "quickstart", progress=progress, log=log,
                    speed_warnings=False)
    losses = [r["loss"] for r in RunDir(run.run_dir).metric_rows() if "loss" in r]
    t = config.training
    recent = max(1, len(losses) // t.epochs if t.epochs else len(losses) // 4)
    recent_loss = sum(losses[-recent:]) / len(losses[-recent:])

    held_out = read_records(sample_path("test"))[0]
    prompt = to_messages(held_out)[0][-2]["content"]
    base_answer, adapted_answer = compare_answers(load_with_adapter(str(model_path), run.run_dir), run.run_dir,
                                                  prompt, max_tokens=64)
    return QuickstartResult(run, model_path, prompt, base_answer, adapted_answer, recent_loss, recent, base_val_loss,
                            time.perf_counter() - start, real)
