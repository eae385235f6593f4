"""Jobs for the server (training runs and evaluations): records on disk, a queue, and one
worker process at a time.

    <workspace>/jobs/
      scheduler.lock         held by the one server scheduling this workspace (locks.py)
      <id>/job.json          the job's small status record (Job)
      <id>/config.json       the run config as checked (paths made absolute, output in the workspace's
                             adapters/, the run's name), inline data included (for an evaluation, the
                             request), written once
      <id>/held_out.jsonl    an evaluation's inline examples; <id>/eval.json its report
      <id>/events.jsonl      one line per progress report
      <id>/worker.log        the worker's stderr

The worker is `python -m mlx_surgical.worker WORKSPACE ID ATTEMPT`: a crash in training ends
that process, never the server, and the server marks the job failed. Every launch and every
resume gives the job a new attempt number, and a record write carrying an older one is refused,
so a worker that lost its job (stopped and resumed at once, or orphaned by a server restart)
can never overwrite the record of the worker that has it now. Records are read and written under
a per-job lock file. The server keeps every record in memory and re-reads only those a worker
may be changing. The worker (worker.py) runs `pipeline.train_run` / `resume_run` or
`eval.evaluate_adapter`, exactly as the CLI does; this module never loads MLX. Requests are
checked and confined to the workspace before they become jobs (server/workspace.py).
"""

import asyncio
import fcntl
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import AsyncIterator, Callable, Iterator, Optional

from .config import OutputConfig, RunConfig, ServeConfig, learning_rate_problem
from .errors import Conflict, NotFound, UserError
from .files import append_jsonl, make_directory, read_json_or_empty, read_jsonl, write_json_atomic, write_jsonl_atomic
from .locks import FileLock, is_locked
from .rundir import EVAL_JSON, RunDir, now

# A job is queued, running, or one of these:
JOB_FINISHED = ("succeeded", "failed", "cancelled", "interrupted")
RESUMABLE = ("cancelled", "interrupted", "failed")
JOB_FILE, CONFIG_FILE, EVENTS_FILE, WORKER_LOG = "job.json", "config.json", "events.jsonl", "worker.log"
RECORD_LOCK, SCHEDULER_LOCK = "job.lock", "scheduler.lock"
# An evaluation job's inline examples, in the job's folder (its report beside them is EVAL_JSON).
HELD_OUT_FILE = "held_out.jsonl"


@dataclass
class Job:
    """job.json: where a job stands (its config is in config.json beside it)."""

    id: str
    seq: int  # orders the queue: creation times have one-second resolution
    run_name: str
    run_dir: str
    kind: str = "train"  # train | eval
    state: str = "queued"  # queued | running | one of JOB_FINISHED
    created: str = ""
    started: Optional[str] = None
    finished: Optional[str] = None
    resume: bool = False
    resume_learning_rate: Optional[float] = None  # a new peak learning rate for the resume
    attempt: int = 0  # raised at every launch and resume; only the worker of the current attempt writes
    worker_pid: Optional[int] = None
    stop_requested: bool = False
    update: int = 0
    total_updates: Optional[int] = None
    loss: Optional[float] = None
    learning_rate: Optional[float] = None
    tokens_per_second: Optional[float] = None
    eta_seconds: Optional[float] = None
    val_loss: Optional[float] = None
    error: Optional[str] = None

    @property
    def resumable(self) -> bool:
        """A training job that stopped, was interrupted or failed (or whose stop is under way)."""
        return self.kind == "train" and (self.state in RESUMABLE or (self.state == "running" and self.stop_requested))

    def public(self) -> dict:
        """What the REST API shows (with whether it can be resumed, so no client keeps the rule)."""
        return {**{name: getattr(self, name) for name in PUBLIC_FIELDS}, "resumable": self.resumable}

    @classmethod
    def from_dict(cls, raw: dict) -> "Job":
        return cls(**{k: v for k, v in raw.items() if k in FIELDS})


FIELDS = tuple(f.name for f in fields(Job))
PUBLIC_FIELDS = tuple(name for name in FIELDS if name not in ("seq", "attempt"))


class StaleWorker(Exception):
    """The job has moved on to another attempt; this worker's reports are not taken."""


class JobStore:
    """Job records under <workspace>/jobs, readable by any process. Each process keeps the records
    it read in memory and re-reads one only when its file changed."""

    def __init__(self, workspace: Path):
        self.workspace = Path(workspace).resolve()
        self.root = make_directory(self.workspace / "jobs")
        self.adapters = self.workspace / OutputConfig.dir
        self._cache: dict[str, tuple[tuple, Job]] = {}  # id -> ((inode, mtime), record)
        self._scanned = False
        self._lock = threading.RLock()

    def path(self, job_id: str) -> Path:
        if not job_id or set(job_id) - set("0123456789abcdef"):
            raise NotFound(f"no job {job_id}")
        return self.root / job_id

    def _read(self, job_id: str) -> Job:
        """The record, from memory when its file has not changed since it was read."""
        path = self.path(job_id) / JOB_FILE
        try:
            stat = path.stat()
        except FileNotFoundError:
            self._cache.pop(job_id, None)
            raise NotFound(f"no job {job_id}") from None
        version = (stat.st_ino, stat.st_mtime_ns)
        cached = self._cache.get(job_id)
        if cached is None or cached[0] != version:
            raw = read_json_or_empty(path)
            if "id" not in raw:
                raise NotFound(f"job {job_id}: its record is unreadable")
            if "config" in raw and not (path.parent / CONFIG_FILE).exists():  # a record from before config.json
                write_json_atomic(path.parent / CONFIG_FILE, raw["config"])
            cached = (version, Job.from_dict(raw))
            self._cache[job_id] = cached
        return cached[1]

    def get(self, job_id: str) -> Job:
        with self._lock:
            return self._read(job_id)

    def all(self) -> list[Job]:
        """Every job in queue order. The first call reads every record; later calls re-read only
        running jobs (a worker writes those) and see everything this process wrote at once."""
        with self._lock:
            if not self._scanned:
                for path in self.root.glob(f"*/{JOB_FILE}"):
                    try:
                        self._read(path.parent.name)
                    except NotFound:
                        continue
                self._scanned = True
            for job_id, (_, job) in list(self._cache.items()):
                if job.state == "running":
                    try:
                        self._read(job_id)
                    except NotFound:
                        continue
            return sorted((job for _, job in self._cache.values()), key=lambda j: j.seq)

    def page(self, offset: int = 0, limit: int = 100) -> tuple[list[Job], int]:
        """Newest first: one page of jobs and the number of jobs."""
        jobs = self.all()
        jobs.reverse()
        return jobs[offset:offset + limit], len(jobs)

    def next_queued(self) -> Optional[Job]:
        """The head of the queue (queued records change only in the scheduling process)."""
        with self._lock:
            return min((job for _, job in self._cache.values() if job.state == "queued"),
                       key=lambda j: j.seq, default=None)

    @contextmanager
    def locked(self, job_id: str) -> Iterator[Job]:
        """The record, read under the job's lock file; changes to it are written when the block
        ends (unless the block deleted the job)."""
        folder = self.path(job_id)
        try:
            fd = os.open(folder / RECORD_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:
            raise NotFound(f"no job {job_id}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            with self._lock:
                job = Job.from_dict(asdict(self._read(job_id)))  # a copy: memory changes only once written
            yield job
            if folder.is_dir():
                self._write(job)
        finally:
            os.close(fd)

    def _write(self, job: Job) -> None:
        path = self.path(job.id) / JOB_FILE
        write_json_atomic(path, asdict(job))
        stat = path.stat()
        with self._lock:
            self._cache[job.id] = ((stat.st_ino, stat.st_mtime_ns), job)

    def worker_write(self, job_id: str, attempt: int, change: Callable[[Job], None],
                     event: Optional[dict] = None) -> Job:
        """A worker's write: its event, then the change to the record, both only while the job is
        still this worker's attempt (else StaleWorker and nothing is written)."""
        with self.locked(job_id) as job:
            if job.attempt != attempt:
                raise StaleWorker(f"job {job_id} is on attempt {job.attempt}, not {attempt}")
            if event is not None:  # the event first: a reader that sees the record has every event
                append_jsonl(self.path(job_id) / EVENTS_FILE, event)
            change(job)
        return job

    def config(self, job_id: str) -> dict:
        self.get(job_id)  # moves the config of a record from before config.json beside it
        return read_json_or_empty(self.path(job_id) / CONFIG_FILE)

    def events(self, job_id: str) -> list[dict]:
        return read_jsonl(self.path(job_id) / EVENTS_FILE)

    async def follow(self, job_id: str, poll_seconds: float = 0.2) -> AsyncIterator[tuple[str, dict]]:
        """("event", each event) as the job writes it, then ("state", its record) once it has finished."""
        sent = 0
        while True:
            current = self.get(job_id)  # read before the events: a finished job has written them all
            events = self.events(job_id)
            for event in events[sent:]:
                yield "event", event
            sent = len(events)
            if current.state in JOB_FINISHED:
                yield "state", current.public()
                return
            await asyncio.sleep(poll_seconds)

    def unfinished(self, run_name: str, kind: Optional[str] = None) -> list[Job]:
        """The jobs queued or running on a run (of one kind, when given)."""
        return [j for j in self.all() if j.run_name == run_name and j.state not in JOB_FINISHED
                and kind in (None, j.kind)]

    def check_name(self, name: str) -> None:
        """Conflict when a job that has not finished, or a run directory, has this run name."""
        with self._lock:
            self.all()  # every record known, so every name in use is seen
            if self.unfinished(name, "train") or RunDir(self.adapters / name).contents():
                raise Conflict(f"config: output.name: a run named '{name}' already exists; choose another name")

    def create(self, config: RunConfig) -> Job:
        """A queued job for a config already through server.workspace.prepare_config. The run name is taken here,
        in one step, so of two requests with the same name exactly one gets it."""
        with self._lock:
            self.check_name(config.output.name)
            name = config.output.name
            job_id = uuid.uuid4().hex[:12]
            self.path(job_id).mkdir(parents=True)
            write_json_atomic(self.path(job_id) / CONFIG_FILE, config.to_dict())
            job = Job(id=job_id, seq=time.time_ns(), run_name=name, run_dir=str(self.adapters / name), created=now())
            self._write(job)
        return job

    def create_eval(self, run_dir: Path, request: dict) -> Job:
        """A queued evaluation of a run, for a request already through server.workspace.prepare_eval.
        Inline examples are written to the job's folder, so the worker reads a file like the CLI."""
        with self._lock:
            job_id = uuid.uuid4().hex[:12]
            self.path(job_id).mkdir(parents=True)
            examples = request.pop("examples", None)
            if examples is not None:
                request["data"] = str(self.path(job_id) / HELD_OUT_FILE)
                write_jsonl_atomic(request["data"], examples)
            write_json_atomic(self.path(job_id) / CONFIG_FILE, request)
            job = Job(id=job_id, seq=time.time_ns(), run_name=run_dir.name, run_dir=str(run_dir), kind="eval",
                      created=now())
            self._write(job)
        return job

    def report(self, job_id: str) -> dict:
        """The report an evaluation job wrote."""
        path = self.path(job_id) / EVAL_JSON
        if self.get(job_id).kind != "eval" or not path.exists():
            raise NotFound(f"job {job_id} has no evaluation report (only finished evaluation jobs have one)")
        return read_json_or_empty(path)

    def delete(self, job_id: str) -> None:
        """Remove a job that is not running (its run directory and adapter stay)."""
        with self.locked(job_id) as job:
            if job.state == "running":
                raise Conflict(f"job {job_id} is running; stop it before deleting it")
            shutil.rmtree(self.path(job_id))
            with self._lock:
                self._cache.pop(job_id, None)

    def prune(self, keep: int) -> int:
        """Delete the oldest finished jobs beyond the newest `keep`; returns how many went."""
        finished = [j for j in self.all() if j.state in JOB_FINISHED]
        for job in finished[:max(len(finished) - keep, 0)]:
            self.delete(job.id)
        return max(len(finished) - keep, 0)

    def recover(self) -> None:
        """After a server restart: a job that was running has lost its server. Its worker, if it
        still lives, stops at its next update and can no longer write the record."""
        for job in self.all():
            if job.state == "running":
                with self.locked(job.id) as current:
                    current.attempt += 1
                    current.state, current.finished = "interrupted", now()
                    current.error = "the server stopped while this job ran"


class Scheduler:
    """Runs queued jobs one at a time, in order, each in a worker process. One per workspace."""

    def __init__(self, store: JobStore, poll_seconds: float = 0.2, keep_finished: int = ServeConfig.keep_jobs):
        self.store = store
        self.poll_seconds = poll_seconds
        self.keep_finished = keep_finished
        self.active: Optional[tuple[str, int, subprocess.Popen]] = None  # job id, attempt, worker
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="job-scheduler", daemon=True)
        self._claim = FileLock(store.root / SCHEDULER_LOCK)

    def claim(self) -> None:
        """Become the workspace's one scheduler, or raise Conflict naming the server that is."""
        self._claim.acquire(f"workspace {self.store.workspace}")

    def start(self) -> None:
        self.store.recover()
        self.store.prune(self.keep_finished)
        self._thread.start()

    def shutdown(self) -> None:
        self._stopping.set()
        self._wake.set()
        with self._lock:
            if self.active:
                self.active[2].send_signal(signal.SIGINT)
        self._thread.join(timeout=5)
        self._claim.release(delete=True)

    @property
    def busy(self) -> bool:
        return self.active is not None

    def stop(self, job_id: str) -> Job:
        with self._lock, self.store.locked(job_id) as job:
            if job.state == "queued":
                job.state, job.finished = "cancelled", now()
            elif job.state == "running" and self.active and self.active[:2] == (job_id, job.attempt):
                self.active[2].send_signal(signal.SIGINT)  # the worker checkpoints, then ends as cancelled
                job.stop_requested = True
            else:
                raise Conflict(f"job {job_id} is {job.state}; only queued or running jobs can be stopped")
        return job

    def resume(self, job_id: str, learning_rate: Optional[float] = None) -> Job:
        """Queue a stopped, interrupted or failed job again, also one whose stop is still under way:
        its worker finishes its checkpoint first (the run's lock makes the new worker wait)."""
        if problem := learning_rate_problem(learning_rate, "learning_rate"):
            raise UserError(problem)
        with self._lock, self.store.locked(job_id) as job:
            if job.kind != "train":
                raise UserError(f"job {job_id} is an evaluation; queue a new one instead of resuming it")
            if not job.resumable:
                raise Conflict(f"job {job_id} is {job.state}; only stopped, interrupted or failed jobs can be resumed")
            job.attempt += 1  # whatever the old worker still reports is not taken
            job.state, job.resume, job.finished, job.error, job.stop_requested = "queued", True, None, None, False
            job.resume_learning_rate = learning_rate
            job.seq = time.time_ns()  # back of the queue
        self._wake.set()
        return job

    def delete(self, job_id: str) -> None:
        with self._lock:
            self.store.delete(job_id)

    def notify(self) -> None:
        """A job was queued: look at once instead of at the next poll."""
        self._wake.set()

    def _loop(self) -> None:
        while not self._stopping.is_set():
            with self._lock:
                if self._reap():
                    self.store.prune(self.keep_finished)
                if self.active is None:
                    queued = self.store.next_queued()
                    # A run still locked is a worker finishing its stop: wait for it, in queue order.
                    if queued is not None and not is_locked(RunDir(Path(queued.run_dir)).lock):
                        self._launch(queued.id)
            self._wake.wait(self.poll_seconds)
            self._wake.clear()

    def _launch(self, job_id: str) -> None:
        with self.store.locked(job_id) as job:
            job.attempt += 1
            job.state, job.started, job.error, job.stop_requested = "running", now(), None, False
            with open(self.store.path(job_id) / WORKER_LOG, "ab") as log:
                process = subprocess.Popen([sys.executable, "-m", "mlx_surgical.worker", str(self.store.workspace),
                                            job_id, str(job.attempt)], stdout=subprocess.DEVNULL, stderr=log)
            job.worker_pid = process.pid
        self.active = (job_id, job.attempt, process)

    def _reap(self) -> bool:
        """Forget a worker that ended; True when one did. A worker that died without saying so
        fails its job (or cancels it, when it was being stopped: a stop that comes while the
        worker is still starting ends it at once), unless the job has moved on to another attempt."""
        if self.active is None or self.active[2].poll() is None:
            return False
        job_id, attempt, process = self.active
        self.active = None
        try:
            with self.store.locked(job_id) as job:
                if job.attempt == attempt and job.state == "running" and job.stop_requested:
                    job.state, job.finished, job.stop_requested = "cancelled", now(), False
                elif job.attempt == attempt and job.state == "running":
                    job.state, job.finished = "failed", now()
                    job.error = (f"the training worker ended unexpectedly (exit code {process.returncode}); "
                                 f"see {WORKER_LOG} in the job folder")
        except NotFound:  # deleted meanwhile
            pass
        return True
