"""The worker for a server job: `python -m mlx_surgical.worker WORKSPACE JOB_ID ATTEMPT`.

It runs in its own process, so a crash in training ends the worker and never the server.
It trains with `pipeline.train_run` / `resume_run`, or evaluates with
`eval.evaluate_adapter`, exactly as the CLI does, and reports each update (or each step of
an evaluation) into the job record and its event stream (jobs.py) for as long as the job is
on its attempt; a worker that lost its job (resumed elsewhere, or its server restarted)
checkpoints at the next update and ends without another word.
"""

import os
import sys
from pathlib import Path
from typing import Callable, Optional

from .checkpoint import TrainState
from .config import config_from_dict
from .errors import TrainingInterrupted, UserError
from .eval import evaluate_adapter
from .files import write_json_atomic
from .jobs import Job, JobStore, StaleWorker
from .pipeline import StopFlag, resume_run, train_run
from .rundir import EVAL_JSON, RunDir, now


class JobProgress:
    """Training callback: copies each report into the job record and the event stream."""

    def __init__(self, store: JobStore, job_id: str, attempt: int, stop: StopFlag):
        self.store, self.job_id, self.attempt, self.stop = store, job_id, attempt, stop

    def report(self, change: Callable[[Job], None], event: Optional[dict] = None) -> None:
        try:
            self.store.worker_write(self.job_id, self.attempt, change, event)
        except StaleWorker:
            self.stop.requested = True

    def on_update(self, report: dict, state: TrainState) -> None:
        values = {key: report[key] for key in ("update", "total_updates", "loss", "learning_rate",
                                               "tokens_per_second", "eta_seconds")}

        def change(job: Job) -> None:
            for name, value in values.items():
                setattr(job, name, value)

        self.report(change, {"type": "progress", **values})

    def on_eval(self, report: dict, state: TrainState, improved: bool) -> None:
        self.report(lambda job: setattr(job, "val_loss", report["val_loss"]),
                    {"type": "validation", "update": report["update"], "val_loss": report["val_loss"]})

    def log(self, line: str) -> None:
        self.report(lambda job: None, {"type": "log", "message": line})

    def finish(self, state: str, error: Optional[str] = None) -> None:
        def change(job: Job) -> None:
            job.state, job.finished, job.error, job.stop_requested = state, now(), error, False

        self.report(change, {"type": "end", "state": state, "error": error})


def run_job(workspace: Path, job_id: str, attempt: int) -> None:
    """Run one job (train or evaluate), reporting through JobProgress."""
    store = JobStore(workspace)
    parent = os.getppid()
    # A worker whose server died stops at the next update, with a checkpoint.
    stop = StopFlag(also=lambda: os.getppid() != parent)
    progress = JobProgress(store, job_id, attempt, stop)
    try:
        job = store.worker_write(job_id, attempt, lambda job: None)
    except StaleWorker:
        return
    if job.kind == "eval":
        evaluate_job(store, job, progress)
        return
    quiet = {"progress": False, "log": lambda _: None, "callbacks": (progress,), "stop_flag": stop}
    try:
        if job.resume and RunDir(Path(job.run_dir)).config.exists():
            resume_run(Path(job.run_dir), learning_rate=job.resume_learning_rate, **quiet)
        else:  # a first start, or a job whose first start ended before writing its run directory
            config = config_from_dict(store.config(job_id), source="job config")
            config.training.learning_rate = job.resume_learning_rate or config.training.learning_rate
            train_run(config, config_name="job", **quiet)
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
    request = store.config(job.id)
    try:
        report = evaluate_adapter(job.run_dir, data=request["data"], overrides=request["eval"], log=progress.log)
    except UserError as e:
        progress.finish("failed", "; ".join(e.problems))
    except KeyboardInterrupt:  # a stop request
        progress.finish("cancelled")
    except Exception as e:  # a bug, but the job record must say it ended
        progress.finish("failed", f"{type(e).__name__}: {e}")
        raise
    else:
        write_json_atomic(store.path(job.id) / EVAL_JSON, report)
        progress.finish("succeeded")


if __name__ == "__main__":
    run_job(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]))
