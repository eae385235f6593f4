"""Jobs for the server (training runs and evaluations): records on disk, a queue, and one
worker process at a time.

A job is a folder `<workspace>/jobs/<id>/` holding `job.json` (its record) and `events.jsonl`
(one line per progress report). While a job runs only its worker process writes the record;
before and after, only the server does. The worker is `python -m mlx_surgical.worker WORKSPACE
ID`: a crash in training ends that process, never the server, and the server marks the job
failed. The worker (worker.py) runs `pipeline.train_run` / `resume_run` or
`eval.evaluate_adapter`, exactly as the CLI does; this module never loads MLX itself, except
to check the examples of a request.
"""

import json
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime
from pathlib import Path
from typing import Any, Optional

from .config import (RunConfig, config_from_dict, eval_problems, load_config, resolve_data_path,
                     resolve_data_paths, section_from_dict)
from .errors import NotFound, UserError
from .files import read_json_or_empty, read_jsonl, write_json_atomic, write_text_atomic
from .registry import find
from .rundir import RunDir, now

# A job is queued, running, or one of these:
FINISHED = ("succeeded", "failed", "cancelled", "interrupted")
RESUMABLE = ("cancelled", "interrupted", "failed")
JOB_FILE, EVENTS_FILE = "job.json", "events.jsonl"
# An evaluation job's inline examples and its report, in the job's folder.
HELD_OUT_FILE, REPORT_FILE = "held_out.jsonl", "eval.json"


@dataclass
class Job:
    """job.json: what was asked (the config) and where it stands."""

    id: str
    seq: int  # orders the queue: creation times have one-second resolution
    run_name: str
    run_dir: str
    config: dict = field(repr=False)  # a RunConfig as a dict; for an evaluation, the request (prepare_eval)
    kind: str = "train"  # train | eval
    state: str = "queued"  # queued | running | one of FINISHED
    created: str = field(default_factory=now)
    started: Optional[str] = None
    finished: Optional[str] = None
    resume: bool = False
    update: int = 0
    total_updates: Optional[int] = None
    loss: Optional[float] = None
    learning_rate: Optional[float] = None
    tokens_per_second: Optional[float] = None
    eta_seconds: Optional[float] = None
    val_loss: Optional[float] = None
    error: Optional[str] = None

    def public(self) -> dict:
        """What the REST API shows: everything but the (possibly large) config."""
        return {k: v for k, v in asdict(self).items() if k not in ("config", "seq")}

    @classmethod
    def from_dict(cls, raw: dict) -> "Job":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names})


class JobStore:
    """Job records under <workspace>/jobs, readable by any process."""

    def __init__(self, workspace: Path):
        self.workspace = Path(workspace).resolve()
        self.root = self.workspace / "jobs"
        self.root.mkdir(parents=True, exist_ok=True)
        self.adapters = self.workspace / "adapters"

    def path(self, job_id: str) -> Path:
        if not job_id or set(job_id) - set("0123456789abcdef"):
            raise NotFound(f"no job {job_id}")
        return self.root / job_id

    def get(self, job_id: str) -> Job:
        path = self.path(job_id) / JOB_FILE
        if not path.exists():
            raise NotFound(f"no job {job_id}")
        return Job.from_dict(read_json_or_empty(path))

    def put(self, job: Job) -> None:
        write_json_atomic(self.path(job.id) / JOB_FILE, asdict(job))

    def all(self) -> list[Job]:
        jobs = [Job.from_dict(read_json_or_empty(p)) for p in self.root.glob(f"*/{JOB_FILE}")]
        return sorted(jobs, key=lambda j: j.seq)

    def events(self, job_id: str) -> list[dict]:
        return read_jsonl(self.path(job_id) / EVENTS_FILE)

    def create(self, config: RunConfig) -> Job:
        """A queued job for a config already through prepare_config."""
        job_id = uuid.uuid4().hex[:12]
        self.path(job_id).mkdir(parents=True)
        job = Job(id=job_id, seq=time.time_ns(), run_name=config.output.name,
                  run_dir=str(self.adapters / config.output.name), config=config.to_dict())
        self.put(job)
        return job

    def create_eval(self, run_dir: Path, request: dict) -> Job:
        """A queued evaluation of a run, for a request already through prepare_eval. Inline
        examples are written to the job's folder, so the worker reads a file like the CLI."""
        job_id = uuid.uuid4().hex[:12]
        self.path(job_id).mkdir(parents=True)
        examples = request.pop("examples", None)
        if examples is not None:
            request["data"] = str(self.path(job_id) / HELD_OUT_FILE)
            write_text_atomic(request["data"], "".join(json.dumps(e) + "\n" for e in examples))
        job = Job(id=job_id, seq=time.time_ns(), run_name=run_dir.name, run_dir=str(run_dir), config=request,
                  kind="eval")
        self.put(job)
        return job

    def report(self, job_id: str) -> dict:
        """The report an evaluation job wrote."""
        path = self.path(job_id) / REPORT_FILE
        if self.get(job_id).kind != "eval" or not path.exists():
            raise NotFound(f"job {job_id} has no evaluation report (only finished evaluation jobs have one)")
        return read_json_or_empty(path)

    def recover(self) -> None:
        """After a server restart: a job that was running has lost its worker."""
        for job in self.all():
            if job.state == "running":
                job.state, job.finished, job.error = "interrupted", now(), "the server stopped while this job ran"
                self.put(job)


def prepare_config(raw: dict, store: JobStore) -> tuple[RunConfig, list[str]]:
    """The request's config, checked like `mlx-surgical validate` and confined to the
    workspace: data files must resolve inside it and runs are written to its adapters/.
    Returns it with validate's notes."""
    from .pipeline import validate_run  # loads MLX for the tokenizer; the rest of the server never does

    config = config_from_dict(raw, source="config")
    problems = [p for name in ("train", "valid") if getattr(config.data, name) is not None
                and (p := workspace_file(store, getattr(config.data, name), f"config: data.{name}"))]
    if config.output.dir != "adapters":
        problems.append("config: output.dir: runs are written to the workspace's adapters/; leave it unset")
    if problems:
        raise UserError(*problems)
    resolve_data_paths(config, store.workspace)
    config.output.dir = str(store.adapters)
    if config.output.name is None:
        config.output.name = f"run-{datetime.now().strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"
    taken = {j.run_name for j in store.all() if j.state not in FINISHED}
    if (store.adapters / config.output.name).exists() or config.output.name in taken:
        raise UserError(f"config: output.name: a run named '{config.output.name}' already exists; choose another name")
    model = Path(config.model.path)
    if not model.is_absolute() and (store.workspace / model).exists():
        config.model.path = str(store.workspace / model)
    return config, validate_run(config)


def workspace_file(store: JobStore, value: str, where: str) -> Optional[str]:
    """The problem with a data file outside the workspace, or None."""
    if value.startswith("bundled:") or (store.workspace / value).resolve().is_relative_to(store.workspace):
        return None
    return (f"{where}: '{value}' is outside the workspace; send the examples inline or put the file in the "
            "workspace")


def prepare_eval(raw: Any, name: str, store: JobStore) -> tuple[Path, dict]:
    """The run to evaluate and the request, checked like `mlx-surgical eval`'s options: held-out
    examples from a file inside the workspace (`data`) or inline (`examples`), else the run's
    validation split, and eval settings (`eval`) over the run's own."""
    # Checking the examples loads MLX, as validating a training config does; listing never does.
    from .data import inline_records, read_records, split_records
    from .eval.examples import read_examples

    if not isinstance(raw, dict):
        raise UserError("request: expected a JSON object with data or examples, and eval settings")
    problems = [f"request: {key}: unknown key; use data (a file in the workspace), examples (inline) or eval"
                for key in raw if key not in ("data", "examples", "eval")]
    training = [j.id for j in store.all() if j.kind == "train" and j.run_name == name and j.state not in FINISHED]
    if training:
        raise UserError(f"adapter '{name}' is still training (job {training[0]}); queue its evaluation when that "
                        "job has finished, or set eval.enabled in the training config")
    run_dir = find(store.adapters, name)
    if not RunDir(run_dir).config.exists():
        problems.append(f"adapter '{name}' is not a run of this workspace (no run_config.json), so its base model "
                        "is unknown; evaluate it with `mlx-surgical eval DIR --model BASE`")
    given = raw.get("eval", {})
    settings = section_from_dict("eval", given, "request", problems)
    problems += [f"request: {p}" for p in eval_problems(settings)]
    overrides = {key: getattr(settings, key) for key in given if hasattr(settings, key)} \
        if isinstance(given, dict) else {}
    data, examples = raw.get("data"), raw.get("examples")
    try:
        if data is not None and examples is not None:
            raise UserError("request: give data or examples, not both")
        if data is not None:
            if not isinstance(data, str):
                raise UserError("request: data: expected a file name inside the workspace")
            outside = workspace_file(store, data, "request: data")
            if outside:
                raise UserError(outside)
            data = resolve_data_path(data, store.workspace, "request: data")
            records = read_records(data)
        elif examples is not None:
            if not isinstance(examples, list) or not examples:
                raise UserError("request: examples: expected a non-empty list of examples")
            records = inline_records(examples, "request: examples")
        elif RunDir(run_dir).config.exists():
            records = split_records(load_config(RunDir(run_dir).config).data, "valid")
        else:
            records = []
        read_examples(records, overrides.get("samples"))
    except UserError as e:
        problems += e.problems
    if problems:
        raise UserError(*problems)
    return run_dir, {"data": data, "examples": examples, "eval": overrides}


class Scheduler:
    """Runs queued jobs one at a time, in order, each in a worker process."""

    def __init__(self, store: JobStore, poll_seconds: float = 0.2):
        self.store = store
        self.poll_seconds = poll_seconds
        self.active: Optional[tuple[str, subprocess.Popen]] = None
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="job-scheduler", daemon=True)

    def start(self) -> None:
        self.store.recover()
        self._thread.start()

    def shutdown(self) -> None:
        self._stopping.set()
        with self._lock:
            if self.active:
                self.active[1].send_signal(signal.SIGINT)
        self._thread.join(timeout=5)

    @property
    def busy(self) -> bool:
        return self.active is not None

    def stop(self, job_id: str) -> Job:
        job = self.store.get(job_id)
        with self._lock:
            if job.state == "queued":
                job.state, job.finished = "cancelled", now()
                self.store.put(job)
            elif job.state == "running" and self.active and self.active[0] == job_id:
                self.active[1].send_signal(signal.SIGINT)  # the worker checkpoints, then ends as cancelled
            else:
                raise UserError(f"job {job_id} is {job.state}; only queued or running jobs can be stopped")
        return job

    def resume(self, job_id: str) -> Job:
        with self._lock:
            job = self.store.get(job_id)
            if job.kind != "train":
                raise UserError(f"job {job_id} is an evaluation; queue a new one instead of resuming it")
            if job.state not in RESUMABLE or not RunDir(Path(job.run_dir)).checkpoint_dirs():
                raise UserError(f"job {job_id} is {job.state} without a checkpoint; only stopped, interrupted "
                                "or failed jobs with a checkpoint can be resumed")
            job.state, job.resume, job.finished, job.error = "queued", True, None, None
            job.seq = time.time_ns()  # back of the queue
            self.store.put(job)
        return job

    def _loop(self) -> None:
        while not self._stopping.is_set():
            with self._lock:
                self._reap()
                if self.active is None:
                    queued = [j for j in self.store.all() if j.state == "queued"]
                    if queued:
                        self._launch(queued[0].id)
            time.sleep(self.poll_seconds)

    def _launch(self, job_id: str) -> None:
        with open(self.store.path(job_id) / "worker.log", "ab") as log:
            process = subprocess.Popen([sys.executable, "-m", "mlx_surgical.worker", str(self.store.workspace), job_id],
                                       stdout=subprocess.DEVNULL, stderr=log)
        self.active = (job_id, process)

    def _reap(self) -> None:
        if self.active is None or self.active[1].poll() is None:
            return
        job_id, process = self.active
        self.active = None
        job = self.store.get(job_id)
        if job.state in ("running", "queued"):  # the worker died before it could say so
            job.state, job.finished = "failed", now()
            job.error = (f"the training worker ended unexpectedly (exit code {process.returncode}); "
                         "see worker.log in the job folder")
            self.store.put(job)
