"""A run directory: every file a run writes, by name, and the typed record of the run.

    adapters/<run>/
      run_config.json          the resolved config the run was started with (config.RunConfig)
      run.json                 RunInfo below: status, data, versions, timings, results, checksums
      adapters.safetensors     the latest adapter, in mlx-lm's format (adapter.py) ...
      adapter_config.json      ... so `mlx_lm.generate --adapter-path <run>` loads the run as it is
      metrics.jsonl            one JSON line per optimizer update and per evaluation
      loss.png                 training and validation loss against updates
      best/                    the adapter with the best validation loss (adapter files + update, val_loss)
      eval.json, eval.md       the latest evaluation report (eval/), in full and for people
      checkpoints/update-NNNNNNN/
        adapters.safetensors, adapter_config.json, optimizer.safetensors, state.json
                               a resumable checkpoint (checkpoint.py); state.json holds the
                               others' sizes and checksums
      run.lock                 held by the one process writing the run (locks.py)

The pipeline writes these; the registry, the server, evaluation and the dashboard read them
through this module. Nothing here imports MLX.
"""

import os
import shutil
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional, TypedDict, Union, get_args, get_origin, get_type_hints, is_typeddict

from .config import MAX_NAME_LENGTH, RUN_NAME_CHARS, OutputConfig, RunConfig, config_from_dict, parse_json_file
from .console import command_line, resume_command
from .errors import Conflict, UserError, parse_user_json, read_user_text
from .files import is_staging, read_jsonl, remove_staging_leftovers, sha256_file, write_failed, write_json_atomic
from .locks import FileLock

RUN_CONFIG = "run_config.json"
RUN_INFO = "run.json"
ADAPTER_FILE = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
METRICS = "metrics.jsonl"
LOSS_PLOT = "loss.png"
EVAL_JSON = "eval.json"
EVAL_MD = "eval.md"
BEST_DIR = "best"
CHECKPOINTS_DIR = "checkpoints"
CHECKPOINT_PREFIX = "update-"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"
LOCK_FILE = "run.lock"
FINISHED = ("succeeded", "stopped_early")  # RunInfo.status of a run that completed

# The files a user ships, checksummed in run.json when a run finishes.
CHECKSUMMED = (ADAPTER_FILE, ADAPTER_CONFIG, f"{BEST_DIR}/{ADAPTER_FILE}", f"{BEST_DIR}/{ADAPTER_CONFIG}")


def require_directory(path: str | Path) -> Path:
    """A run or adapter directory named by the user; a mistyped one is refused with the command
    that lists the runs where it was looked for."""
    path = Path(path)
    if not path.is_dir():
        if (Path(OutputConfig.dir) / path).is_dir():  # a run's name, as `adapters show` takes it
            raise UserError(f"{path}: no such directory; did you mean {Path(OutputConfig.dir) / path}?")
        root = Path(OutputConfig.dir) if path.parent == Path(".") else path.parent
        listing = (command_line("mlx-surgical", "adapters", "list") if root == Path(OutputConfig.dir)
                   else command_line("mlx-surgical", "adapters", "--root", root, "list"))
        raise UserError(f"{path}: no such directory; `{listing}` shows the runs in {root}")
    return path


@dataclass(frozen=True)
class RunDir:
    """The paths of one run directory."""

    path: Path

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def config(self) -> Path:
        return self.path / RUN_CONFIG

    @property
    def info(self) -> Path:
        return self.path / RUN_INFO

    @property
    def adapter(self) -> Path:
        return self.path / ADAPTER_FILE

    @property
    def adapter_config(self) -> Path:
        return self.path / ADAPTER_CONFIG

    @property
    def metrics(self) -> Path:
        return self.path / METRICS

    @property
    def loss_plot(self) -> Path:
        return self.path / LOSS_PLOT

    @property
    def eval_json(self) -> Path:
        return self.path / EVAL_JSON

    @property
    def eval_md(self) -> Path:
        return self.path / EVAL_MD

    @property
    def best(self) -> Path:
        return self.path / BEST_DIR

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS_DIR

    def checkpoint(self, update: int) -> Path:
        return self.checkpoints / f"{CHECKPOINT_PREFIX}{update:07d}"

    def checkpoint_dirs(self) -> list[Path]:
        """Complete checkpoints, oldest first (staging directories start with a dot, rejected
        checkpoints carry a suffix)."""
        if not self.checkpoints.is_dir():
            return []
        return sorted(p for p in self.checkpoints.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)
                      and p.name[len(CHECKPOINT_PREFIX):].isdigit())

    @property
    def lock(self) -> Path:
        return self.path / LOCK_FILE

    def metric_rows(self) -> list[dict]:
        return read_jsonl(self.metrics)

    def contents(self) -> list[Path]:
        """What the run has written (not its lock or a killed writer's staging files)."""
        if not self.path.is_dir():
            return []
        return [p for p in self.path.iterdir() if p.name != LOCK_FILE and not is_staging(p)]

    def finished(self) -> bool:
        return RunInfo.load(self.path).status in FINISHED and self.adapter.exists()

    def restartable(self) -> bool:
        """A run of ours that never reached its first checkpoint (nor its end) holds nothing
        worth keeping."""
        ours = self.config.exists() or self.info.exists()
        return ours and not self.checkpoint_dirs() and not self.finished()

    def clear(self) -> None:
        """Remove everything the run wrote, to start it again from the beginning."""
        for path in self.contents():
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()

    def remove_staging_leftovers(self) -> None:
        for directory in (self.path, self.checkpoints, self.best):
            remove_staging_leftovers(directory)

    def checksums(self) -> dict[str, str]:
        """sha256 of the files a user ships, recorded in run.json when a run finishes."""
        return {name: sha256_file(self.path / name) for name in CHECKSUMMED if (self.path / name).exists()}


def load_run_config(run_dir: str | Path) -> RunConfig:
    """The config a run was started with, as it saved it (its data paths absolute)."""
    path = RunDir(require_directory(run_dir)).config
    if not path.exists():
        raise UserError(f"{run_dir}: not a run directory (no {path.name})")
    return config_from_dict(parse_json_file(path, "run config"), source=str(path))


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def default_run_name(prefix: str, started: Optional[datetime] = None) -> str:
    """A run's name when output.name is unset: what started it and when, e.g. my_run-20261201-093000.
    The prefix (a config file's name) is made a plain name, as output.name must be."""
    stamp = (started or datetime.now()).strftime("%Y%m%d-%H%M%S")
    plain = "".join(c if c in RUN_NAME_CHARS else "_" for c in prefix).lstrip(".")
    return f"{plain[:MAX_NAME_LENGTH - len(stamp) - 1] or 'run'}-{stamp}"


@dataclass
class DataInfo:
    hash: str
    train_examples: int
    valid_examples: int
    train_tokens: int
    truncated: list  # example names cut to max_seq_length
    skipped: list  # example names left out


@dataclass
class Timings:
    load_seconds: Optional[float] = None
    train_seconds: Optional[float] = None
    finished: Optional[str] = None


@dataclass
class BestInfo:
    val_loss: Optional[float] = None
    update: Optional[int] = None


@dataclass
class FinalInfo:
    loss: Optional[float] = None
    val_loss: Optional[float] = None


class LearningRateChange(TypedDict):
    """A learning rate set on resume; resuming again starts from the last one's."""

    update: int
    learning_rate: float
    previous: float
    at: str


_JSON_NAMES = {str: "a string", int: "a whole number", float: "a number", bool: "true or false", dict: "an object",
               list: "a list", type(None): "null", type(MISSING): "missing"}


def from_json(value: Any, kind: Any, where: str, path: Path) -> Any:
    """`value`, read from run.json or adapter_config.json for the field `where` declared as `kind`,
    with its records rebuilt; a value of another type is refused naming the field, so no reader
    trips on it later."""
    if get_origin(kind) is Union:  # Optional[X]
        if value is None:
            return None
        kind = next(k for k in get_args(kind) if k is not type(None))
    outer = dict if is_dataclass(kind) or is_typeddict(kind) else get_origin(kind) or kind
    if type(value) is not outer and not (outer is float and type(value) is int):
        top = where.split(".")[0].split("[")[0]  # every top-level field may go: each has a default
        raise UserError(f"{path}: {where} must be {_JSON_NAMES[outer]}, not {_JSON_NAMES[type(value)]}; "
                        f'correct it, or delete "{top}" from the file')
    args = get_args(kind)
    if is_dataclass(kind):  # unknown keys of a record are left out, as at the top level
        return kind(**{f.name: from_json(value.get(f.name, MISSING), f.type, f"{where}.{f.name}", path)
                       for f in fields(kind)
                       if f.name in value or (f.default is MISSING and f.default_factory is MISSING)})
    if is_typeddict(kind):
        for key, item_kind in get_type_hints(kind).items():
            from_json(value.get(key, MISSING), item_kind, f"{where}.{key}", path)
    elif outer is list and args:
        for i, item in enumerate(value):
            from_json(item, args[0], f"{where}[{i}]", path)
    elif outer is dict and args:
        for key, item in value.items():
            from_json(item, args[1], f"{where}.{key}", path)
    return value


@dataclass
class RunInfo:
    """run.json. Written when a run starts, at every status change and when it finishes."""

    name: str
    created: str = field(default_factory=now)
    status: str = "running"  # running | succeeded | stopped_early | interrupted | failed
    update: int = 0
    data: Optional[DataInfo] = None
    trainable_parameters: Optional[int] = None
    schedule: Optional[dict] = None  # train.Schedule as a dict
    ranks: int = 1
    prompt_format: Optional[str] = None
    compute_path: Optional[str] = None  # tuning.PathChoice.describe()
    versions: dict = field(default_factory=dict)
    timings: Timings = field(default_factory=Timings)
    first_loss: Optional[float] = None  # the loss of the run's first update
    best: Optional[BestInfo] = None
    final: Optional[FinalInfo] = None
    error: Optional[str] = None
    checksums: dict[str, str] = field(default_factory=dict)  # file name in the run -> sha256
    learning_rate_changes: list[LearningRateChange] = field(default_factory=list)  # oldest first
    # Keys this version does not know (a newer mlx_surgical wrote them), kept when rewriting.
    extra: dict = field(default_factory=dict, repr=False)

    @classmethod
    def load(cls, run_dir: Path) -> "RunInfo":
        """The record of a run, also of run directories written by earlier versions; a run
        without run.json (an exported adapter) gets a record named after its folder. A damaged
        run.json is a UserError naming the file and the field."""
        path = RunDir(Path(run_dir)).info
        if not path.exists():
            return cls(name=Path(run_dir).name, created="")
        raw = parse_user_json(read_user_text(path, "run record"), path)
        if type(raw) is not dict:
            raise UserError(f"{path}: not a run record (a JSON object is expected, found {_JSON_NAMES[type(raw)]}); "
                            "restore it, or delete it to keep the adapter as an exported one")
        raw.pop("base_model", None)  # kept by earlier versions; the base is recorded in adapter_config.json
        known = {f.name: f.type for f in fields(cls) if f.name != "extra"}
        values = {k: from_json(v, known[k], k, path) for k, v in raw.items() if k in known}
        values.setdefault("name", Path(run_dir).name)
        values.setdefault("created", "")
        return cls(**values, extra={k: v for k, v in raw.items() if k not in known})

    def to_dict(self) -> dict:
        data = {k: v for k, v in asdict(self).items() if k != "extra"}
        return {**self.extra, **data}

    def save(self, run_dir: Path) -> None:
        write_json_atomic(RunDir(Path(run_dir)).info, self.to_dict())


@dataclass
class RunClaim:
    """The run directory, owned by this process until `release`."""

    run: RunDir
    lock: FileLock
    created: bool  # this process made the directory (and removes it if it then writes nothing)

    def release(self) -> None:
        self.lock.release(delete=True)  # a finished run keeps no lock file (locks.py makes this safe)
        if self.created and not self.run.contents():
            shutil.rmtree(self.run.path, ignore_errors=True)


def claim_run(run_dir: Path, new: bool) -> RunClaim:
    """Become the one writer of a run directory, before any model is loaded. A new run may take
    an empty directory or one whose earlier start never reached a checkpoint; a second writer is
    refused with the holder's pid, and the lock of a dead writer is taken over."""
    run = RunDir(Path(run_dir))
    if new and run.path.exists() and not run.path.is_dir():
        raise UserError(new_run_problem(run))
    if not new and not run.path.is_dir():
        raise UserError(f"{run.path}: no such run directory")
    created = not run.path.exists()
    try:
        run.path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise write_failed(run.path, e) from None
    lock = FileLock(run.lock).acquire(f"run {run.path}")
    claim = RunClaim(run, lock, created)
    if new and (taken := new_run_problem(run)):  # looked at again under the lock: another writer may have been first
        claim.release()
        raise Conflict(taken)
    run.remove_staging_leftovers()
    return claim


def new_run_problem(run: RunDir) -> Optional[str]:
    """Why a new run may not be written to this directory, or None: an empty directory, or one
    whose earlier start never reached a checkpoint, may be taken."""
    if run.path.exists() and not run.path.is_dir():
        return f"output.name: {run.path} exists and is not a directory; choose another output.name"
    if run.contents() and not run.restartable():
        return (f"output.name: run directory {run.path} already exists; resume it with "
                f"`{resume_command(run.path)}` or choose another output.name")
    return None


def output_location_problems(out_dir: str | Path) -> list[str]:
    """Why no run could be written under out_dir."""
    out_dir = Path(out_dir)
    existing = next(p for p in (out_dir, *out_dir.absolute().parents) if p.exists())
    if not existing.is_dir():
        return [f"output.dir: {out_dir} cannot be created: {existing} is a file"]
    if not os.access(existing, os.W_OK | os.X_OK):
        return [f"output.dir: no permission to write in {existing}; choose another output.dir"]
    return []


def output_problems(out_dir: str | Path, name: Optional[str]) -> list[str]:
    """Why a new run could not be written to out_dir/name, found before any training."""
    out_dir = Path(out_dir)
    problems = output_location_problems(out_dir)
    if problems:
        return problems
    if name is not None and (taken := new_run_problem(RunDir(out_dir / name))):
        return [taken]
    return []
