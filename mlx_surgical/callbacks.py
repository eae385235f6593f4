"""Training callbacks: the console progress bar, the metrics file, checkpoints and the best
adapter. The loop knows none of them; the pipeline picks which to pass."""

import sys
from dataclasses import replace
from pathlib import Path
from typing import Literal, Optional, TextIO

from matplotlib.figure import Figure
from tqdm.auto import tqdm

from .adapter import AdapterConfig, write_adapter
from .checkpoint import TrainState, save_checkpoint
from .console import counted, is_terminal
from .files import append_jsonl, staged_file
from .rundir import RunDir
from .surgery import adapter_weights


ProgressStyle = Literal["auto", "bar", "lines", "off"]


class ConsoleProgress:
    """Progress on stderr. "bar": a tqdm bar over optimizer updates with loss, learning rate
    and tokens/s. "lines": a plain line at the first update, every 5% of the run and at the
    last, for logs and pipes (a bar there is a flood of carriage-return frames). "auto" picks
    the bar on a terminal and lines elsewhere; True means "auto" and False "off"."""

    LINES_PER_RUN = 20

    def __init__(self, style: ProgressStyle | bool = "auto", stream: Optional[TextIO] = None):
        self.stream = stream or sys.stderr
        style = {True: "auto", False: "off"}.get(style, style)
        if style == "auto":
            style = "bar" if is_terminal(self.stream) else "lines"
        self.style = style
        self.bar = None
        self.first = self.total = self.every = 0
        self.seconds = 0.0

    def on_start(self, info: dict) -> None:
        self.first, self.total = info["update"] + 1, info["total_updates"]
        self.every = max(1, -(-self.total // self.LINES_PER_RUN))
        if self.style == "bar":
            self.bar = tqdm(total=self.total, initial=info["update"], unit="update", dynamic_ncols=True,
                            file=self.stream)
        elif self.style == "lines":
            self._line(f"training {counted(self.total - info['update'], 'optimizer update')}"
                       + (f", from update {info['update']}" if info["update"] else ""))

    def on_update(self, report: dict, state: TrainState) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{report['loss']:.3f}", lr=f"{report['learning_rate']:.2e}",
                                 tok_s=f"{report['tokens_per_second']:.0f}", refresh=False)
            self.bar.update(1)
        elif self.style == "lines":
            self.seconds += report["seconds"]
            update = report["update"]
            if update % self.every == 0 or update in (self.first, self.total):
                self._line(f"update {update}/{self.total}: loss {report['loss']:.3f}, "
                           f"lr {report['learning_rate']:.2e}, {report['tokens_per_second']:,.0f} tokens/s, "
                           f"{tqdm.format_interval(self.seconds)} so far, {tqdm.format_interval(report['eta_seconds'])} left")

    def on_eval(self, report: dict, state: TrainState, improved: bool) -> None:
        if report["val_loss"] is None or self.style == "off":
            return
        line = f"update {report['update']}: validation loss {report['val_loss']:.4f}" + (" (best)" if improved else "")
        self.bar.write(line, file=self.stream) if self.bar is not None else self._line(line)

    def on_stop(self, reason: str, state: TrainState) -> None:
        self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def _line(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()


class MetricsFile:
    """Appends one JSON line per update and per evaluation to metrics.jsonl, and keeps the
    losses of this session's updates for the run's summary."""

    def __init__(self, run_dir: Path):
        self.path = RunDir(Path(run_dir)).metrics
        self.losses: list[float] = []

    def on_update(self, report: dict, state: TrainState) -> None:
        append_jsonl(self.path, report)
        self.losses.append(report["loss"])

    def on_eval(self, report: dict, state: TrainState, improved: bool) -> None:
        append_jsonl(self.path, report)


class Checkpointer:
    """Writes a resumable checkpoint every `save_every` updates and when the run is stopped,
    keeps the adapter at the top of the run directory current (so mlx-lm can load the latest
    at any time), and the best adapter by validation loss in best/."""

    def __init__(self, run_dir: Path, model, optimizer, adapter_config: AdapterConfig, save_every: int, keep: int):
        self.run_dir = RunDir(Path(run_dir))
        self.model, self.optimizer = model, optimizer
        self.adapter_config = adapter_config
        self.save_every, self.keep = save_every, keep

    def save(self, state: TrainState) -> Path:
        path = save_checkpoint(self.run_dir.path, self.model, self.optimizer, state, self.adapter_config, self.keep)
        write_adapter(self.run_dir.path, adapter_weights(self.model), self.adapter_config)
        return path

    def on_update(self, report: dict, state: TrainState) -> None:
        if state.update % self.save_every == 0:
            self.save(state)

    def on_eval(self, report: dict, state: TrainState, improved: bool) -> None:
        if improved:
            write_adapter(self.run_dir.best, adapter_weights(self.model),
                          replace(self.adapter_config, update=state.update, val_loss=report["val_loss"]))

    def on_stop(self, reason: str, state: TrainState) -> None:
        if reason == "interrupted":
            self.save(state)


def plot_losses(rows: list[dict], out_path: Path) -> Optional[Path]:
    """Training and validation loss against optimizer updates, as a PNG."""
    train = [(r["update"], r["loss"]) for r in rows if "loss" in r]
    valid = [(r["update"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
    if not train:
        return None
    # A bare Figure (no pyplot): no GUI backend or global state, also without a display.
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    ax.plot(*zip(*train), label="training loss", linewidth=1)
    if valid:
        ax.plot(*zip(*valid), "o-", label="validation loss")
    ax.set_xlabel("optimizer update")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with staged_file(out_path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=100)
    return out_path
