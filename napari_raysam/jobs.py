"""Training jobs on a Ray cluster through Ray Jobs: submit, follow, stop.

A job survives the process that submitted it (napari may be closed); ``follow`` can be
re-attached to by job id. The ``backend`` package travels with the job as a
``py_modules`` entry, so the cluster needs only the dependencies installed.
"""

from __future__ import annotations

import json
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ray.job_submission import JobStatus, JobSubmissionClient

import backend
from backend.config import TrainConfig
from napari_raysam.cluster import Cluster, ClusterError

TERMINAL = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}


class JobFailed(RuntimeError):
    """The training job ended without a model; the message carries the end of its log."""


@dataclass(frozen=True)
class JobUpdate:
    """What ``follow`` reports while a job runs."""

    status: str
    metrics: list[dict]
    """All ``metrics.jsonl`` lines so far (one per finished epoch)."""
    progress: dict | None
    """``progress.json``: epoch, epochs, step, steps_per_epoch; None before the first step."""
    new_log: str
    """Log text printed since the previous update."""


def client(cluster: Cluster) -> JobSubmissionClient:
    try:
        return JobSubmissionClient(cluster.dashboard_url, headers=cluster.headers)
    except Exception as error:  # Ray raises bare ConnectionError/RuntimeError with HTTP details
        raise ClusterError(f"cannot use the Ray Jobs API at {cluster.dashboard_url}: {error}") from error


def submit_training(cluster: Cluster, config: TrainConfig) -> str:
    """Submit ``python -m backend train`` for ``config``; returns the job id (= the run name)."""
    entrypoint = f"python -m backend train --config {shlex.quote(json.dumps(config.to_dict()))}"
    env_vars = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"} if cluster.is_local else {}
    return client(cluster).submit_job(
        entrypoint=entrypoint,
        submission_id=config.run_name,
        runtime_env={"py_modules": [str(Path(backend.__file__).parent)], "env_vars": env_vars},
        metadata={"app": "napari-raysam", "run_dir": str(config.run_dir)},
    )


def read_run(run_dir: Path) -> tuple[list[dict], dict | None]:
    """Metrics lines and progress of a run directory (empty while the job has not written them)."""
    metrics_path, progress_path = run_dir / "metrics.jsonl", run_dir / "progress.json"
    metrics = []
    if metrics_path.exists():
        for line in metrics_path.read_text().splitlines():
            try:
                metrics.append(json.loads(line))
            except json.JSONDecodeError:  # a line being written right now
                break
    progress = json.loads(progress_path.read_text()) if progress_path.exists() else None
    return metrics, progress


def follow(
    cluster: Cluster,
    job_id: str,
    run_dir: Path,
    on_update: Callable[[JobUpdate], None] | None = None,
    poll_s: float = 1.0,
    should_stop: Callable[[], bool] = lambda: False,
) -> Path:
    """Wait for a job, reporting status, metrics, progress and new log text; returns the model folder.

    Raises JobFailed when the job fails or is stopped. ``should_stop`` lets a GUI stop
    following (the job keeps running; follow it again later by id).
    """
    jobs = client(cluster)
    log_seen = 0
    last = None
    while not should_stop():
        status = jobs.get_job_status(job_id)
        log = jobs.get_job_logs(job_id)
        metrics, progress = read_run(run_dir)
        update = JobUpdate(status=str(status.value), metrics=metrics, progress=progress, new_log=log[log_seen:])
        log_seen = len(log)
        if on_update is not None and (update.new_log or (status, len(metrics), progress) != last):
            on_update(update)
        last = (status, len(metrics), progress)
        if status in TERMINAL:
            model = run_dir / "model"
            if status == JobStatus.SUCCEEDED and (model / "meta.json").exists():
                return model
            info = jobs.get_job_info(job_id)
            raise JobFailed(
                f"training job {job_id} ended as {status.value}: {info.message or ''}\n"
                f"last lines of its log:\n{_tail(log, 30)}"
            )
        time.sleep(poll_s)
    return run_dir / "model"


def report_epochs(
    log: Callable[[str], None], job_log: Callable[[str], None] | None = None
) -> Callable[[JobUpdate], None]:
    """An ``on_update`` for ``follow`` that logs one line per finished epoch (and the job's log, if asked)."""
    logged: set[int] = set()

    def on_update(update: JobUpdate) -> None:
        if job_log is not None and update.new_log:
            job_log(update.new_log)
        for line in update.metrics:
            if line["epoch"] not in logged:
                logged.add(line["epoch"])
                log(
                    f"epoch {line['epoch'] + 1}: train_loss {line['train_loss']:.4f}  val_loss {line['val_loss']:.4f}"
                    f"  val_iou {line['val_iou']:.3f}  {line['samples_per_s']:.2f} samples/s"
                )

    return on_update


def stop(cluster: Cluster, job_id: str) -> bool:
    """Ask the cluster to stop a job; True if it was running."""
    return client(cluster).stop_job(job_id)


def _tail(text: str, lines: int) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])
