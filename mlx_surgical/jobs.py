"""Training jobs for the server: records on disk, a queue, and one worker process at a time.

A job is a folder `<workspace>/jobs/<id>/` holding `job.json` (its record) and `events.jsonl`
(one line per progress report). While a job runs only its worker process writes the record;
before and after, only the server does. The worker is `python -m mlx_surgical.jobs WORKSPACE
ID`: a crash in training ends that process, never the server, and the server marks the job
failed. Training itself is `pipeline.train_run` / `resume_run`, exactly as the CLI runs it.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from .checkpoint import TrainState, read_jsonl, write_json_atomic
from .config import RunConfig, config_from_dict
from .errors import NotFound, UserError

# A job is queued, running, or one of these:
FINISHED = ("succeeded", "failed", "cancelled", "interrupted")
RESUMABLE = ("cancelled", "interrupted", "failed")
JOB_FILE, EVENTS_FILE = "job.json", "events.jsonl"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


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

    def get(self, job_id: str) -> dict:
        path = self.path(job_id) / JOB_FILE
        if not path.exists():
            raise NotFound(f"no job {job_id}")
        return json.loads(path.read_text())

    def put(self, job: dict) -> None:
        write_json_atomic(self.path(job["id"]) / JOB_FILE, job)

    def all(self) -> list[dict]:
        jobs = [json.loads(p.read_text()) for p in self.root.glob(f"*/{JOB_FILE}")]
        return sorted(jobs, key=lambda j: j["seq"])

    def events(self, job_id: str) -> list[dict]:
        return read_jsonl(self.path(job_id) / EVENTS_FILE)

    def create(self, config: RunConfig) -> dict:
        """A queued job for a config already through prepare_config."""
        job_id = uuid.uuid4().hex[:12]
        self.path(job_id).mkdir(parents=True)
        # seq orders the queue: creation times have one-second resolution.
        job = {"id": job_id, "seq": time.time_ns(), "state": "queued", "created": _now(), "started": None, "finished": None,
               "run_name": config.output.name, "run_dir": str(self.adapters / config.output.name),
               "config": config.to_dict(), "resume": False, "update": 0, "total_updates": None, "loss": None,
               "learning_rate": None, "tokens_per_second": None, "eta_seconds": None, "val_loss": None,
               "error": None}
        self.put(job)
        return job

    def recover(self) -> None:
        """After a server restart: a job that was running has lost its worker."""
        for job in self.all():
            if job["state"] == "running":
                job.update(state="interrupted", finished=_now(), error="the server stopped while this job ran")
                self.put(job)


def prepare_config(raw: dict, store: JobStore) -> RunConfig:
    """The request's config, checked like `mlx-surgical validate` and confined to the
    workspace: data files must resolve inside it and runs are written to its adapters/."""
    from .config import resolve_data_paths
    from .pipeline import validate_run

    config = config_from_dict(raw, source="config")
    problems = []
    for name in ("train", "valid"):
        value = getattr(config.data, name)
        if value is None:
            continue
        if value.startswith("bundled:"):
            continue
        resolved = (store.workspace / value).resolve()
        if not resolved.is_relative_to(store.workspace):
            problems.append(f"config: data.{name}: '{value}' is outside the workspace; "
                            "send the examples inline or put the file in the workspace")
    if config.output.dir != "adapters":
        problems.append("config: output.dir: runs are written to the workspace's adapters/; leave it unset")
    if problems:
        raise UserError(*problems)
    resolve_data_paths(config, store.workspace)
    config.output.dir = str(store.adapters)
    if config.output.name is None:
        config.output.name = f"run-{datetime.now().strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"
    taken = {j["run_name"] for j in store.all() if j["state"] not in FINISHED}
    if (store.adapters / config.output.name).exists() or config.output.name in taken:
        raise UserError(f"config: output.name: a run named '{config.output.name}' already exists; choose another name")
    model = Path(config.model.path)
    if not model.is_absolute() and (store.workspace / model).exists():
        config.model.path = str(store.workspace / model)
    validate_run(config)
    return config


class JobProgress:
    """Training callback: copies each report into the job record and the event stream."""

    def __init__(self, store: JobStore, job: dict):
        self.store, self.job = store, job
        self.events = store.path(job["id"]) / EVENTS_FILE

    def _emit(self, event: dict) -> None:
        with self.events.open("a", encoding="utf-8") as f:
            f.write(json.dumps(event) + "\n")

    def on_update(self, report: dict, state: TrainState) -> None:
        remaining = report["total_updates"] - report["update"]
        eta = state.train_seconds / max(report["update"], 1) * remaining
        self.job.update(update=report["update"], total_updates=report["total_updates"], loss=report["loss"],
                        learning_rate=report["learning_rate"], tokens_per_second=report["tokens_per_second"],
                        eta_seconds=eta)
        self.store.put(self.job)
        self._emit({"type": "progress", **{k: self.job[k] for k in (
            "update", "total_updates", "loss", "learning_rate", "tokens_per_second", "eta_seconds")}})

    def on_eval(self, report: dict, state: TrainState, improved: bool) -> None:
        self.job["val_loss"] = report["val_loss"]
        self.store.put(self.job)
        self._emit({"type": "validation", "update": report["update"], "val_loss": report["val_loss"]})

    def finish(self, state: str, error: Optional[str] = None) -> None:
        # The event first: a reader that sees the finished record has every event.
        self._emit({"type": "end", "state": state, "error": error})
        self.job.update(state=state, finished=_now(), error=error)
        self.store.put(self.job)


def run_job(workspace: Path, job_id: str) -> None:
    """The worker: train one job, reporting through JobProgress. Runs in its own process."""
    from .pipeline import StopFlag, resume_run, train_run
    from .train import TrainingInterrupted

    store = JobStore(workspace)
    job = store.get(job_id)
    job.update(state="running", started=_now(), error=None)
    store.put(job)
    progress = JobProgress(store, job)
    parent = os.getppid()
    # A worker whose server died stops at the next update, with a checkpoint.
    stop = StopFlag(also=lambda: os.getppid() != parent)
    quiet = {"progress": False, "log": lambda _: None, "callbacks": (progress,), "stop_flag": stop}
    try:
        if job["resume"]:
            resume_run(Path(job["run_dir"]), **quiet)
        else:
            train_run(config_from_dict(job["config"], source="job config"), config_name="job", **quiet)
    except TrainingInterrupted:
        progress.finish("cancelled" if stop.requested else "interrupted")
    except UserError as e:
        progress.finish("failed", "; ".join(e.problems))
    except Exception as e:  # anything else is a bug, but the job record must say it ended
        progress.finish("failed", f"{type(e).__name__}: {e}")
        raise
    else:
        progress.finish("succeeded")


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

    def stop(self, job_id: str) -> dict:
        job = self.store.get(job_id)
        with self._lock:
            if job["state"] == "queued":
                job.update(state="cancelled", finished=_now())
                self.store.put(job)
            elif job["state"] == "running" and self.active and self.active[0] == job_id:
                self.active[1].send_signal(signal.SIGINT)  # the worker checkpoints, then ends as cancelled
            else:
                raise UserError(f"job {job_id} is {job['state']}; only queued or running jobs can be stopped")
        return job

    def resume(self, job_id: str) -> dict:
        with self._lock:
            job = self.store.get(job_id)
            if job["state"] not in RESUMABLE or not (Path(job["run_dir"]) / "checkpoints").is_dir():
                raise UserError(f"job {job_id} is {job['state']} without a checkpoint; only stopped, interrupted "
                                "or failed jobs with a checkpoint can be resumed")
            job.update(state="queued", resume=True, finished=None, error=None, seq=time.time_ns())  # back of the queue
            self.store.put(job)
        return job

    def _loop(self) -> None:
        while not self._stopping.is_set():
            with self._lock:
                self._reap()
                if self.active is None:
                    queued = [j for j in self.store.all() if j["state"] == "queued"]
                    if queued:
                        self._launch(queued[0]["id"])
            time.sleep(self.poll_seconds)

    def _launch(self, job_id: str) -> None:
        with open(self.store.path(job_id) / "worker.log", "ab") as log:
            process = subprocess.Popen([sys.executable, "-m", "mlx_surgical.jobs", str(self.store.workspace), job_id],
                                       stdout=subprocess.DEVNULL, stderr=log)
        self.active = (job_id, process)

    def _reap(self) -> None:
        if self.active is None or self.active[1].poll() is None:
            return
        job_id, process = self.active
        self.active = None
        job = self.store.get(job_id)
        if job["state"] in ("running", "queued"):  # the worker died before it could say so
            job.update(state="failed", finished=_now(),
                       error=f"the training worker ended unexpectedly (exit code {process.returncode}); "
                             "see worker.log in the job folder")
            self.store.put(job)


if __name__ == "__main__":
    run_job(Path(sys.argv[1]), sys.argv[2])
