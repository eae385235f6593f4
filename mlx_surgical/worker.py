"""The worker for a server job: `python -m mlx_surgical.worker WORKSPACE JOB_ID`.

It runs in its own process, so a crash in training ends the worker and never the server.
It trains with `pipeline.train_run` / `resume_run`, or evaluates with
`eval.evaluate_adapter`, exactly as the CLI does, and reports each update (or each step of
an evaluation) into the job record and its event stream (jobs.py).
"""

import os
import sys
from pathlib import Path
from typing import Optional

from .checkpoint import TrainState
from .config import config_from_dict
from .errors import TrainingInterrupted, UserError
from .eval import evaluate_adapter
from .files import append_jsonl, write_json_atomic
from .jobs import EVENTS_FILE, REPORT_FILE, Job, JobStore
from .pipeline import StopFlag, resume_run, train_run
from .rundir import now


class JobProgress:
    """Training callback: copies each report into the job record and the event stream."""

    def __init__(self, store: JobStore, job: Job):
        self.store, self.job = store, job
        self.events = store.path(job.id) / EVENTS_FILE

    def on_update(self, report: dict, state: TrainState) -> None:
        job = self.job
        job.update, job.total_updates, job.loss = report["update"], report["total_updates"], report["loss"]
        job.learning_rate, job.tokens_per_second = report["learning_rate"], report["tokens_per_second"]
        job.eta_seconds = state.train_seconds / max(job.update, 1) * (job.total_updates - job.update)
        self.store.put(job)
        append_jsonl(self.events, {"type": "progress", "update": job.update, "total_updates": job.total_updates,
                                   "loss": job.loss, "learning_rate": job.learning_rate,
                                   "tokens_per_second": job.tokens_per_second, "eta_seconds": job.eta_seconds})

    def on_eval(self, report: dict, state: TrainState, improved: bool) -> None:
        self.job.val_loss = report["val_loss"]
        self.store.put(self.job)
        append_jsonl(self.events, {"type": "validation", "update": report["update"], "val_loss": report["val_loss"]})

    def log(self, line: str) -> None:
        append_jsonl(self.events, {"type": "log", "message": line})

    def finish(self, state: str, error: Optional[str] = None) -> None:
        # The event first: a reader that sees the finished record has every event.
        append_jsonl(self.events, {"type": "end", "state": state, "error": error})
        self.job.state, self.job.finished, self.job.error = state, now(), error
        self.store.put(self.job)


def run_job(workspace: Path, job_id: str) -> None:
    """Run one job (train or evaluate), reporting through JobProgress."""
    store = JobStore(workspace)
    job = store.get(job_id)
    job.state, job.started, job.error = "running", now(), None
    store.put(job)
    progress = JobProgress(store, job)
    if job.kind == "eval":
        evaluate_job(store, job, progress)
        return
    parent = os.getppid()
    # A worker whose server died stops at the next update, with a checkpoint.
    stop = StopFlag(also=lambda: os.getppid() != parent)
    quiet = {"progress": False, "log": lambda _: None, "callbacks": (progress,), "stop_flag": stop}
    try:
        if job.resume:
            resume_run(Path(job.run_dir), **quiet)
        else:
            train_run(config_from_dict(job.config, source="job config"), config_name="job", **quiet)
    except TrainingInterrupted:
        progress.finish("cancelled" if stop.requested else "interrupted")
    except UserError as e:
        progress.finish("failed", "; ".join(e.problems))
    except Exception as e:  # anything else is a bug, but the job record must say it ended
        progress.finish("failed", f"{type(e).__name__}: {e}")
        raise
    else:
        progress.finish("succeeded")


def evaluate_job(store: JobStore, job: Job, progress: JobProgress) -> None:
    """Evaluate the job's run as `mlx-surgical eval` does; the report also goes into the job's folder."""
    try:
        report = evaluate_adapter(job.run_dir, data=job.config["data"], overrides=job.config["eval"],
                                  log=progress.log)
    except UserError as e:
        progress.finish("failed", "; ".join(e.problems))
    except KeyboardInterrupt:  # a stop request
        progress.finish("cancelled")
    except Exception as e:  # a bug, but the job record must say it ended
        progress.finish("failed", f"{type(e).__name__}: {e}")
        raise
    else:
        write_json_atomic(store.path(job.id) / REPORT_FILE, report)
        progress.finish("succeeded")


if __name__ == "__main__":
    run_job(Path(sys.argv[1]), sys.argv[2])
