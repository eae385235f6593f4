"""The stages joined into runs: `train_run` (new or resumed) and `validate_run`.

The CLI and the server call these and nothing deeper, so a run started either way is the
same run: the same run directory, the same files, the same checks.
"""

import hashlib
import json
import platform
import signal
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Callable, Optional

import mlx.core as mx
import mlx_lm

from . import __version__
from .adapter import AdapterConfig, PromptRecord, lora_problems, write_adapter
from .backend import keep_freed_memory, slow_path_warnings, training_dtype
from .batches import BatchStream, eval_batches
from .callbacks import Checkpointer, ConsoleProgress, MetricsFile, ProgressStyle, plot_losses
from .checkpoint import TrainState, latest_checkpoint, load_checkpoint
from .config import RunConfig, learning_rate_problem, per_rank_batch, save_config
from .console import command_line, counted, resume_command, working
from .data import Record, split_records
from .errors import TrainingDiverged, TrainingInterrupted, UserError
from .eval import evaluate_adapter
from .eval.examples import read_examples
from .eval.report import format_table
from .files import write_jsonl_atomic
from .loss import training_loss
from .model import (LoadedModel, inspect_model_dir, is_local, load_model, load_tokenizer, local_model_dir,
                    looks_like_local_path, model_shape)
from .prompt import EncodedData, PromptFormat, encode_records
from .rundir import (FINISHED, BestInfo, DataInfo, FinalInfo, RunDir, RunInfo, claim_run,
                     default_run_name, load_run_config, now, output_location_problems, output_problems)
from .surgery import adapter_weights, attach_lora
from .train import (LoopSettings, evaluate, learning_rate_schedule, make_optimizer, schedule_for, train)
from .tuning import choose_path, pairing_options

TUNING_BATCHES = 2  # the run's first micro-batches time the candidate compute paths


@dataclass
class RunResult:
    run_dir: Path
    status: str  # succeeded | stopped_early | interrupted
    updates: int
    trainable_parameters: int
    first_loss: Optional[float]
    final_loss: Optional[float]
    final_val_loss: Optional[float]
    best_val_loss: Optional[float]
    rank: int = 0  # under mlx.launch only rank 0 reports

    def summary_lines(self) -> list[str]:
        losses = f", loss {self.first_loss:.4f} -> {self.final_loss:.4f}" if self.final_loss is not None else ""
        best = f", best validation loss {self.best_val_loss:.4f}" if self.best_val_loss is not None else ""
        return [f"{self.status}: {counted(self.updates, 'update')}{losses}{best}", f"adapter: {self.run_dir}"]


def versions() -> dict:
    return {"mlx_surgical": __version__, "mlx": mx.__version__, "mlx_lm": mlx_lm.__version__,
            "python": platform.python_version(), "platform": platform.platform()}


SPLITS = ("train", "valid")


def data_hash(records: dict[str, list[Record]]) -> str:
    """Identifies the training and validation examples, whether in files or inline."""
    digest = hashlib.sha256()
    for split in SPLITS:
        for record in records[split]:
            digest.update(json.dumps(record.fields, sort_keys=True).encode())
    return digest.hexdigest()[:16]


def read_splits(config: RunConfig) -> tuple[dict[str, list[Record]], list[str]]:
    """Both splits' examples, and every problem with either (the evaluation's examples among
    them when the run ends with an evaluation); a split that cannot be read is left out."""
    records, problems = {}, []
    for split in SPLITS:
        try:
            records[split] = split_records(config.data, split)
        except UserError as e:
            problems += e.problems
    if config.eval.enabled and "valid" in records:
        try:
            read_examples(records["valid"], config.eval.samples)
        except UserError as e:
            problems += e.problems
    return records, problems


def encode_splits(config: RunConfig, fmt: PromptFormat,
                  records: dict[str, list[Record]]) -> tuple[dict[str, EncodedData], list[str]]:
    """The splits read as training sees them, and every problem: an example over max_seq_length
    with overlength 'error', a chat template that refuses one, no training example left."""
    encoded, problems = {}, []
    for split, rows in records.items():
        try:
            encoded[split] = encode_split(config, fmt, split, rows)
        except UserError as e:
            problems += e.problems
    if records.get("train") and "train" in encoded and not encoded["train"].samples:
        problems.append("training data: no example is left after length checks; raise training.max_seq_length")
    return encoded, problems


def new_run_dir(config: RunConfig, config_name: str, started: datetime) -> Path:
    """The directory a new run will write: output.name, or the config's name and start time."""
    return Path(config.output.dir) / (config.output.name or default_run_name(config_name, started))


def encode_split(config: RunConfig, fmt: PromptFormat, split: str,
                 records: Optional[list[Record]] = None) -> EncodedData:
    """A split's examples as the config writes and cuts them; `records` when already read."""
    records = split_records(config.data, split) if records is None else records
    return encode_records(records, fmt, config.training.max_seq_length, config.data.overlength,
                          config.data.mask_prompt)


class StopFlag:
    """Set by SIGINT/SIGTERM (or a caller) and polled by the loop after each update, so a stop
    always lands on a clean update boundary; the first Ctrl-C says so at once, since an update
    can take many seconds. A second Ctrl-C stops at once. `also` is a further reason to stop,
    polled with the flag."""

    def __init__(self, also: Optional[Callable[[], bool]] = None, announce: bool = True):
        self.requested = False
        self.also = also
        self.announce = announce

    def __call__(self) -> bool:
        return self.requested or (self.also is not None and self.also())

    def install(self):
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

        def handler(signum, frame):
            if self.requested and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self.requested = True
            if self.announce:
                sys.stderr.write("\nstopping after this update, saving a checkpoint"
                                 + (" (press again to abort)\n" if signum == signal.SIGINT else "\n"))
                sys.stderr.flush()

        for s in previous:
            signal.signal(s, handler)
        return lambda: [signal.signal(s, h) for s, h in previous.items()]


def train_run(config: RunConfig, config_name: str = "run", resume_dir: Optional[Path] = None,
              progress: ProgressStyle | bool = "auto", log: Callable[[str], None] = print, callbacks: tuple = (),
              stop_flag: Optional[StopFlag] = None, speed_warnings: bool = True,
              learning_rate: Optional[float] = None) -> RunResult:
    """Train (or resume) one run and write its directory. Raises UserError for bad input,
    Conflict when another process writes the run, TrainingDiverged when the loss or the weights
    stop being finite, and TrainingInterrupted after a checkpointed stop (or an abort); each
    message says how to continue. `progress` is a ConsoleProgress style; with speed_warnings, a
    slow path this machine could avoid is named before anything loads. On resume,
    `learning_rate` replaces the peak learning rate from the checkpoint on (recorded in run.json).

    Under `mlx.launch` every rank runs this function: each trains on its share of every global
    batch, and only rank 0 writes files and reports (the run directory must be reachable
    from every rank to resume)."""
    t_start = time.perf_counter()
    world = mx.distributed.init()
    ranks, primary = world.size(), world.rank() == 0
    per_rank_batch(config.training, ranks)
    if learning_rate is not None and resume_dir is None:
        raise UserError("--learning-rate goes with --resume; a new run takes training.learning_rate from its config")
    if problem := learning_rate_problem(learning_rate, "--learning-rate"):
        raise UserError(problem)
    if not primary:
        log, progress, callbacks = (lambda _: None), "off", ()

    def from_rank0(value: int) -> int:
        """Rank 0's value on every rank, so all agree on the run's name and whether it is taken."""
        return int(mx.distributed.all_sum(mx.array(value if primary else 0), group=world, stream=mx.cpu).item())

    if resume_dir:
        run_dir = Path(resume_dir)
        info = RunInfo.load(run_dir)
        if info.status in FINISHED:
            raise UserError(f"{run_dir}: this run already finished ({info.status.replace('_', ' ')} at update "
                            f"{info.update}); there is nothing to resume. To train longer, start a new run "
                            "with more training.epochs or training.iters")
    else:
        run_dir = new_run_dir(config, config_name, datetime.fromtimestamp(from_rank0(int(time.time()))))
        problems = output_location_problems(config.output.dir)
        if problems:
            raise UserError(*problems)
    claim, refusal = None, None
    if primary:
        try:
            claim = claim_run(run_dir, new=resume_dir is None)
        except UserError as e:
            refusal = e
    if from_rank0(int(refusal is not None)):
        raise refusal or UserError(f"{run_dir}: rank 0 could not take the run directory (see its message)")
    try:
        return _train_owned(config, RunDir(run_dir), resume_dir is not None, t_start, world, progress, log,
                            callbacks, stop_flag, speed_warnings, learning_rate)
    finally:
        if claim is not None:
            claim.release()


@dataclass
class _Inputs:
    loaded: LoadedModel
    fmt: PromptFormat
    train: EncodedData
    valid: EncodedData
    data_hash: str


def _load_inputs(config: RunConfig, run: RunDir, resumed: Optional[RunInfo], progress: ProgressStyle | bool,
                 log: Callable[[str], None], speed_warnings: bool) -> _Inputs:
    """The model and the encoded data, checked (against the run's record when `resumed`)
    before anything is written."""
    # Read (and check) the data before the model: a bad data file is reported in a second, not
    # after downloading or loading gigabytes.
    records, problems = read_splits(config)
    if problems:
        raise UserError(*problems)
    if speed_warnings:
        for warning in slow_path_warnings(config, model_shape(config.model.path, config.model.revision,
                                                              download=True)):
            log(f"warning: {warning}")
    dtype = training_dtype(config.model.dtype)
    if dtype != config.model.dtype:
        log(f"model.dtype auto: training in {dtype}, the fast dtype on MLX's CPU backend")
    with working(f"loading {config.model.path}", enabled=progress not in (False, "off")):
        loaded = load_model(config.model.path, config.model.revision, dtype)
    trained_on = AdapterConfig.read(run.path).base if resumed and run.adapter_config.exists() else None
    if trained_on is not None and trained_on.fingerprint != loaded.shape.fingerprint():
        raise UserError(f"{run.path}: this run was trained on {trained_on.path} ({trained_on.shape}), but "
                        f"{config.model.path} is now {loaded.shape.describe()}; resume needs the same base model")
    problems = lora_problems(config.lora, loaded.shape, config.model.path)
    if problems:
        raise UserError(*problems)
    fmt = PromptFormat.for_data(loaded.tokenizer, config.data)
    encoded, problems = encode_splits(config, fmt, records)
    if problems:
        raise UserError(*problems)
    train_data, valid_data = encoded["train"], encoded["valid"]
    for line in train_data.report_lines("train") + valid_data.report_lines("valid"):
        log(line)
    current_hash = data_hash(records)
    if resumed and resumed.data is not None and resumed.data.hash != current_hash:
        raise UserError(f"{run.path}: the training data changed since this run started; "
                        "resume needs the same examples (or start a new run)")
    return _Inputs(loaded, fmt, train_data, valid_data, current_hash)


def _train_owned(config: RunConfig, run: RunDir, resume: bool, t_start: float, world, progress: ProgressStyle | bool,
                 log: Callable[[str], None], callbacks: tuple, stop_flag: Optional[StopFlag], speed_warnings: bool,
                 learning_rate: Optional[float]) -> RunResult:
    """train_run, once this process owns the run directory."""
    ranks, primary = world.size(), world.rank() == 0
    run_dir = run.path
    info = RunInfo.load(run_dir) if resume else RunInfo(name=run_dir.name)

    inputs = _load_inputs(config, run, info if resume else None, progress, log, speed_warnings)
    loaded, fmt, train_data, valid_data = inputs.loaded, inputs.fmt, inputs.train, inputs.valid

    t = config.training
    schedule = schedule_for(len(train_data.samples), t)
    stream = BatchStream(train_data.samples, t.batch_size, t.seed, t.max_seq_length, world.rank(), ranks)
    trainable = attach_lora(loaded.model, config.lora, t.seed)
    previous_peak = info.learning_rate_changes[-1]["learning_rate"] if info.learning_rate_changes else t.learning_rate
    peak = learning_rate or previous_peak
    lr = learning_rate_schedule(peak, min(t.min_learning_rate, peak), schedule.warmup_updates, schedule.updates,
                                t.schedule)
    optimizer = make_optimizer(lr, t.weight_decay)
    optimizer.init(loaded.model.trainable_parameters())
    adapter_cfg = AdapterConfig.for_run(config.lora, loaded.shape, config.model.path, str(loaded.path.resolve()),
                                        PromptRecord(fmt.style, config.data.system_prompt,
                                                     config.training.max_seq_length, config.data.mask_prompt))

    state = TrainState()
    restored = load_checkpoint(run_dir, loaded.model, optimizer, warn=log, set_aside=primary) if resume else None
    if restored is not None:
        state = restored
        if primary:
            kept = _truncate_metrics(run, state.update)
            if info.first_loss is None:  # run.json from before first_loss was recorded
                info.first_loss = next((r["loss"] for r in kept if "loss" in r), None)
        log(f"resuming {run_dir} from update {state.update} of {schedule.updates}")
    else:
        if run.contents():
            log(f"{run_dir} has no checkpoint (its earlier start ended before the first one); "
                "starting it from the beginning")
            info = RunInfo(name=run_dir.name)
        if primary:  # only now: bad input above leaves nothing behind
            run.clear()
            save_config(config, run.config)
            write_adapter(run_dir, adapter_weights(loaded.model), adapter_cfg)
    if learning_rate is not None:
        info.learning_rate_changes.append({"update": state.update, "learning_rate": learning_rate,
                                           "previous": previous_peak, "at": now()})
        log(f"learning rate {previous_peak:g} -> {learning_rate:g} from update {state.update + 1}")

    info.status = "running"
    info.error = None
    info.data = DataInfo(inputs.data_hash, len(train_data.samples), len(valid_data.samples), train_data.tokens,
                         train_data.truncated, train_data.skipped)
    info.trainable_parameters = trainable
    info.schedule = schedule.to_dict()
    info.ranks = ranks
    info.prompt_format = fmt.style
    info.versions = versions()
    info.timings.load_seconds = round(time.perf_counter() - t_start, 2)
    write_info = (lambda: info.save(run_dir)) if primary else (lambda: None)
    write_info()
    per_rank = per_rank_batch(t, ranks)
    log(f"run {run_dir}: {counted(trainable, 'trainable parameter')}, {counted(len(train_data.samples), 'example')}, "
        f"{counted(schedule.updates, 'optimizer update')} ({counted(schedule.epochs, 'epoch')} x "
        f"{counted(schedule.micro_batches_per_epoch, 'micro-batch', 'micro-batches')} / "
        f"{counted(t.grad_accumulation_steps, 'accumulation step')})"
        + (f"; {ranks} ranks, {counted(per_rank, 'example')} each per micro-batch" if ranks > 1 else ""))

    keep_freed_memory()
    choice = choose_path(loaded.model, loaded.shape, config.model.dtype, t.grad_checkpoint, t.cpu_math,
                         t.cpu_quantized_matmul, lambda path: training_loss(loaded.model, t.grad_checkpoint,
                                                                            path.fast_math),
                         [stream.batch(position) for position in range(TUNING_BATCHES)], log,
                         pairing_options(t.cpu_paired_micro_batches, t.grad_accumulation_steps, ranks))
    log(choice.describe())
    info.compute_path = choice.describe()
    write_info()
    loss_fn = training_loss(loaded.model, t.grad_checkpoint, choice.path.fast_math)

    def validation_loss():
        return evaluate(loaded.model, loss_fn,
                        eval_batches(valid_data.samples, t.batch_size, t.max_seq_length), choice.path.paired)

    console = ConsoleProgress(progress)
    checkpointer = Checkpointer(run_dir, loaded.model, optimizer, adapter_cfg, t.save_every, t.keep_checkpoints)
    metrics = MetricsFile(run_dir)
    stop_flag = stop_flag or StopFlag(announce=primary)
    restore_signals = stop_flag.install()
    settings = LoopSettings(schedule.updates, t.grad_accumulation_steps, t.eval_every, t.patience, t.seed,
                            world if ranks > 1 else None, choice.path.paired)
    writers = (metrics, checkpointer) if primary else ()

    status = "failed"
    try:
        result = train(loaded.model, optimizer, loss_fn, stream.batch, settings, state,
                       validation_loss if valid_data.samples else None,
                       callbacks=(console, *writers, *callbacks), should_stop=stop_flag)
        status = "stopped_early" if result.stopped_early else "succeeded"
    except TrainingInterrupted as e:
        status = "interrupted"
        raise TrainingInterrupted(f"{e}; checkpoint saved. Continue with: {resume_command(run_dir)}") from None
    except KeyboardInterrupt:  # a second Ctrl-C: abort mid-update, back to the last checkpoint
        status = "interrupted"
        raise TrainingInterrupted(
            f"aborted during update {state.update + 1}; " +
            (f"continue from the last checkpoint with: {resume_command(run_dir)}" if latest_checkpoint(run_dir)
             else f"no checkpoint was saved yet; start it again from the first update with: "
                  f"{resume_command(run_dir)}")) from None
    except TrainingDiverged as e:
        diverged = TrainingDiverged(" ".join([*e.problems, _after_divergence(run, peak)]))
        info.error = str(diverged)
        raise diverged from None
    finally:
        restore_signals()
        console.close()
        if info.first_loss is None and metrics.losses:
            info.first_loss = metrics.losses[0]
        info.status = status
        info.update = state.update
        info.timings.train_seconds = round(state.train_seconds, 2)
        info.timings.finished = now()
        info.best = BestInfo(state.best_val_loss, state.best_update)
        write_info()
        if primary:
            plot_losses(run.metric_rows(), run.loss_plot)

    if primary:
        write_adapter(run_dir, adapter_weights(loaded.model), adapter_cfg)
    final_loss = metrics.losses[-1] if metrics.losses else (info.final.loss if info.final else None)
    info.final = FinalInfo(final_loss, result.final_val_loss)
    if primary:
        info.checksums = run.checksums()
    write_info()
    if primary and config.eval.enabled:
        log(format_table(evaluate_adapter(run_dir, loaded=loaded, log=log)))
    return RunResult(run_dir, status, state.update, trainable, info.first_loss, final_loss,
                     result.final_val_loss, state.best_val_loss, world.rank())


def _after_divergence(run: RunDir, peak: float) -> str:
    """What is left after a divergence, and how to go on: said truthfully, from the files."""
    kept = latest_checkpoint(run.path)
    if kept is None:
        return ("No checkpoint was written before it; lower training.learning_rate in the config and start "
                "the run again (the same command restarts it).")
    return (f"The last checkpoint, {kept.name}, holds finite weights and is kept; continue from it with a lower "
            f"learning rate: {command_line('mlx-surgical', 'train', '--resume', run.path, '--learning-rate', f'{peak / 10:.3g}')}")


def _truncate_metrics(run: RunDir, update: int) -> list[dict]:
    """Drop rows written after the checkpoint we resume from; they will be written again."""
    rows = [r for r in run.metric_rows() if isinstance(r.get("update"), int) and r["update"] <= update]
    write_jsonl_atomic(run.metrics, rows)
    return rows


def resume_run(run_dir: Path, **kwargs) -> RunResult:
    return train_run(load_run_config(run_dir), resume_dir=Path(run_dir), **kwargs)


def validate_run(config: RunConfig) -> list[str]:
    """Check a config, its model's files, its data and its output location without loading
    weights. Returns what was found; raises UserError listing every problem. Lengths are
    checked when the tokenizer is local."""
    problems, notes = [], []
    encoded = {}
    tokenizer = None
    path = config.model.path
    try:
        try:
            model_dir = local_model_dir(path, config.model.revision, download=False)
        except UserError:
            if is_local(path) or looks_like_local_path(path):
                raise
            model_dir = None  # a Hugging Face repo id, checked once it is in the local cache
            notes.append(f"model {path} is not local: its files and the example lengths not checked")
        if model_dir is not None:
            problems += lora_problems(config.lora, inspect_model_dir(model_dir), path)
            tokenizer = load_tokenizer(str(model_dir))
    except UserError as e:
        problems += e.problems
    problems += output_problems(config.output.dir, config.output.name)
    records, data_problems = read_splits(config)
    problems += data_problems
    if tokenizer is not None:
        try:
            encoded, encoding_problems = encode_splits(config, PromptFormat.for_data(tokenizer, config.data), records)
            problems += encoding_problems
        except UserError as e:  # a prompt format the tokenizer cannot write
            problems += e.problems
    for split in records:
        notes += [*(encoded[split].report_lines(split) if split in encoded else []),
                  f"{split}: {counted(len(records[split]), 'example')}"]
    if encoded.get("train") and encoded["train"].samples:
        updates = schedule_for(len(encoded["train"].samples), config.training).updates
        notes.append(f"schedule: {counted(updates, 'optimizer update')}")
    if problems:
        raise UserError(*problems)
    return notes
