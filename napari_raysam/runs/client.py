"""The run client: submit, list, follow, stop training runs on a Ray cluster (Ray Jobs).

The CLI (``napari-raysam train`` / ``runs ...``) and the fine-tune dock are two faces of this
module. A run is one training job; its name is the job's submission id and is also stored in
the job's metadata (with the run directory, base model, mode and dataset), so a run is found
again by name after napari was closed, and ``runs list`` shows only this project's jobs.
The ``backend`` package travels with the job as a ``py_modules`` entry, so the cluster needs
only the dependencies installed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ray.job_submission import JobSubmissionClient

import backend
from backend.config import TrainConfig
from backend.dataset import open_dataset
from backend.storage import Location, StorageError, is_uri, location, unreachable_storage, upload_dataset
from napari_raysam.cluster import Cluster, ClusterError
from napari_raysam.runs.files import (
    CONFIG_FILE, MetricsReader, model_folder, model_written_ns, read_baseline, read_progress,
)
from napari_raysam.runs.logs import KEPT_LINES, LogTail
from napari_raysam.runs.state import RunLifecycle, RunState, state_of_job

APP = "napari-raysam"
"""The ``app`` entry of our jobs' metadata: how ``runs`` tells them from other jobs on a cluster."""
_DRIVER_ERROR = "error: "
"""How ``python -m backend`` starts the one line that says why it failed."""
_AGENT_NOT_READY = "No available agent"
"""Ray's Jobs API, on a head whose job agent has not started yet (just after ``ray start``)."""
AGENT_WAIT_S = 30
"""How long ``submit`` waits for that agent, asking once a second."""
# Every job keeps each worker's "rank R of W on Ray node N" line (backend.ray_train prints them) in its
# log. Without this, Ray's driver folds lines from several workers that differ only in words with digits,
# within 5 s, into the first one's text ("[repeated 2x across cluster]"), and drops a line repeated once:
# the log showed rank 0's node only.
JOB_ENV = {"RAY_DEDUP_LOGS_ALLOW_REGEX": r"rank \d+ of \d+ on Ray node "}
# A job on a cluster we started on this machine: every Ray port on 127.0.0.1, and two of Ray Train's
# helpers off. The preemption watcher is one more process (an interpreter importing Ray) started
# while the training worker imports PyTorch on the same cores, and a desktop is never preempted;
# Ray Train's metrics feed a dashboard nobody opens here. Remote clusters keep both.
LOCAL_JOB_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_TRAIN_METRICS_ENABLED": "0",
}


def _local_job_env() -> dict[str, str]:
    """The environment of a job on a cluster we started here: ``LOCAL_JOB_ENV`` and this user's storage access.

    The cluster runs on this machine as this user, so its jobs get the object-store endpoint and
    credentials (``AWS_*``) and the download cache of this process. A remote cluster has its own
    (deploy/: a Kubernetes secret), and nothing of this machine's is sent to it.
    """
    forwarded = {k: v for k, v in os.environ.items() if k.startswith("AWS_") or k == "NAPARI_RAYSAM_CACHE"}
    return {**LOCAL_JOB_ENV, **forwarded}


class RunError(RuntimeError):
    """A run cannot be submitted, found or followed; the message says what to do."""


class RunFailed(RunError):
    """The run ended without a model; the message carries the reason and the end of its log."""


@dataclass(frozen=True)
class RunInfo:
    """One run as the cluster knows it."""

    name: str
    job_id: str
    """Ray's submission id: the run name, or ``<name>-resume-<k>`` for a resumed run."""
    state: RunState
    run_dir: Location
    """A local folder or an object-store location (``backend.storage``)."""
    base_model: str
    mode: str
    images: int | None
    message: str
    """Ray's message for the job (why it failed, for instance); may be empty."""
    start_time: float | None
    """Seconds since the epoch (None before it started)."""
    end_time: float | None


@dataclass(frozen=True)
class RunUpdate:
    """What following a run reports, whenever something changed."""

    state: RunState
    metrics: list[dict]
    """Every ``metrics.jsonl`` line so far, one per finished epoch."""
    progress: dict | None
    """``progress.json`` (epoch, epochs, step, steps_per_epoch, ...); None before the first step."""
    new_log: str
    """Log text that arrived since the previous update."""
    elapsed_s: float
    """Seconds since the job started (0 while pending)."""
    model: Location | None = None
    """The exported model folder (local, or in the object store), once this job has written it: the worker writes it last (contract 2),
    so it is complete while the job is still running (Ray Train tearing down, seconds) and stays set
    when the run succeeds."""
    message: str = ""
    """Why it failed, or a note on the connection (lost, retrying)."""
    baseline: dict | None = None
    """Once ended: the base model's validation before training (``val_loss``, ``val_iou``)."""


class RunClient:
    """Runs on one cluster. Every method talks to the cluster's Jobs API; none touches Qt."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self._jobs = self._make_jobs_client()

    def _make_jobs_client(self) -> JobSubmissionClient:
        try:
            return JobSubmissionClient(self.cluster.dashboard_url, headers=self.cluster.headers)
        except Exception as error:  # Ray raises bare ConnectionError/RuntimeError with HTTP details
            raise ClusterError(f"cannot use the Ray Jobs API at {self.cluster.dashboard_url}: {error}") from error

    # -- verbs ------------------------------------------------------------------------------------
    def submit(self, config: TrainConfig, *, images: int | None = None, resume: bool = False) -> RunInfo:
        """Submit ``python -m backend train`` for ``config``.

        A run name that is already taken (on the cluster, or by a run directory in the storage)
        is refused unless ``resume``: then the run continues from its last epoch checkpoint.
        A local dataset is uploaded into the storage first (once, by content) when the cluster
        could not read it: an object-store storage, or a cluster that is not this machine's.

        Args:
            images: how many annotated images the dataset holds, for the run history.
        """
        name = config.run_name
        existing = self._latest_jobs().get(name)
        try:
            has_files = (config.run_dir / CONFIG_FILE).exists()
        except Exception as error:  # an object store: botocore's connection and credential errors
            raise StorageError(unreachable_storage(config.storage, error)) from error
        if (existing is not None or has_files) and not resume:
            where = f"on {self.cluster.dashboard_url} ({existing.state.value})" if existing else f"in {config.storage}"
            raise RunError(
                f"a run named '{name}' already exists {where}: choose another run name, or resume that run "
                "(`napari-raysam train ... --resume`)"
            )
        if resume and existing is not None and not existing.state.ended:
            raise RunError(f"run '{name}' is still {existing.state.value}: follow it instead of resuming it")
        job_id = name if existing is None else f"{name}-resume-{int(time.time())}"
        config = self._with_launcher(self._with_reachable_data(config), resumed=resume and has_files)
        # exec: the driver is the process Ray Jobs started, not a child of its shell. Stopped at the
        # moment it starts, Ray signals the shell before it has forked, and the driver trained on,
        # orphaned, holding the cluster's CPUs (seen when Cancel was pressed while the run was pending).
        entrypoint = f"exec python -m backend train --config {shlex.quote(json.dumps(config.to_dict()))}"
        env_vars = {**JOB_ENV, **(_local_job_env() if self.cluster.is_local else {})}
        metadata = {
            "app": APP, "run_name": name, "run_dir": str(config.run_dir), "base_model": config.model,
            "mode": config.mode, "dataset": config.data, "images": "" if images is None else str(images),
        }
        # a driver that trains reserves its worker's resources: the job waits (pending) until they are free
        driver_resources = (
            {"entrypoint_num_cpus": config.cpus_per_worker, "entrypoint_num_gpus": int(config.use_gpu)}
            if config.launcher == "driver" else {}
        )
        # A head that has just started answers "No available agent to submit job, please try again
        # later" until its job agent is up (seconds): wait for it rather than fail the user's click.
        for attempt in range(1, AGENT_WAIT_S + 1):
            try:
                self._jobs.submit_job(
                    entrypoint=entrypoint,
                    submission_id=job_id,
                    runtime_env={"py_modules": [str(Path(backend.__file__).parent)], "env_vars": env_vars},
                    metadata=metadata,
                    **driver_resources,
                )
                break
            except RuntimeError as error:
                if _AGENT_NOT_READY in str(error) and attempt < AGENT_WAIT_S:
                    time.sleep(1.0)
                    continue
                raise RunError(_plain_job_error(error, name, self.cluster)) from error
        return self.info(name)

    def runs(self) -> list[RunInfo]:
        """This project's runs on the cluster (the latest job of each run name), newest first."""
        return sorted(self._latest_jobs().values(), key=lambda run: run.start_time or time.time(), reverse=True)

    def info(self, name: str) -> RunInfo:
        """The run called ``name``.

        Raises:
            RunError: the cluster has no run of that name.
        """
        run = self._latest_jobs().get(name)
        if run is None:
            raise RunError(
                f"there is no run named '{name}' on {self.cluster.dashboard_url}: "
                "`napari-raysam runs list` shows the runs there"
            )
        return run

    def resume(self, name: str, *, epochs: int | None = None) -> RunInfo:
        """Continue an ended run from its latest epoch checkpoint (after its driver died, or for more epochs).

        The run's own ``config.json`` (read from its storage) is submitted again, with ``epochs``
        when given; the new job is ``<name>-resume-<time>``, under the same run name.

        Raises:
            RunError: no such run, it is still going, or its storage holds no config.
        """
        run = self.info(name)
        try:
            values = json.loads((run.run_dir / CONFIG_FILE).read_text())
        except FileNotFoundError:
            raise RunError(f"run '{name}' left no {CONFIG_FILE} in {run.run_dir}: it cannot be resumed") from None
        except Exception as error:  # an object store: botocore's connection and credential errors
            raise StorageError(unreachable_storage(str(run.run_dir), error)) from error
        config = TrainConfig.from_dict({**values, **({"epochs": epochs} if epochs else {})})
        return self.submit(config, images=run.images, resume=True)

    def stop(self, name: str) -> bool:
        """Ask the cluster to stop the run; True if it was still pending or running."""
        run = self.info(name)
        try:
            return bool(self._jobs.stop_job(run.job_id))
        except RuntimeError as error:
            raise RunError(_plain_job_error(error, name, self.cluster)) from error

    def follow(
        self,
        name: str,
        *,
        poll_s: float = 1.0,
        should_stop: Callable[[], bool] = lambda: False,
        retries: int = 30,
    ) -> Iterator[RunUpdate]:
        """Yield a :class:`RunUpdate` whenever the run's state, metrics, progress or log changed.

        The last update has an end state. The log arrives over Ray's log stream (only new text),
        metrics are read from where the previous read stopped, the status is one small request per
        ``poll_s``. A dropped connection is retried ``retries`` times (backing off up to 10 s)
        with an update saying so, and so is a storage whose files cannot be read (an object store
        that does not answer); ``should_stop`` lets a GUI stop following (the run goes on).
        The model is reported as soon as its folder is complete, before the job has ended.
        """
        run = self.info(name)
        try:
            earlier_model = model_written_ns(run.run_dir)  # a resumed run's earlier export is not this job's model
        except Exception as error:  # an object store: botocore's connection and credential errors
            raise StorageError(unreachable_storage(str(run.run_dir), error)) from error
        lifecycle = RunLifecycle(RunState.PENDING)
        metrics = MetricsReader(run.run_dir)
        progress: dict | None = None
        tail = LogTail(self._make_jobs_client, run.job_id)
        tail.start()
        last: tuple | None = None
        failures = unread = 0
        try:
            while not should_stop():
                try:
                    details = self._jobs.get_job_info(run.job_id)
                    failures = 0
                except OSError as error:  # requests' ConnectionError and timeouts are OSErrors
                    failures += 1
                    if failures > retries:
                        raise RunError(
                            f"lost the connection to {self.cluster.dashboard_url} ({error}); the run goes on "
                            f"there: follow it again with `napari-raysam runs follow {name}`"
                        ) from error
                    yield RunUpdate(
                        lifecycle.state, metrics.lines, progress, "", 0.0,
                        message=f"lost the connection to the cluster; retrying ({failures}/{retries})",
                    )
                    time.sleep(min(2.0**failures, 10.0))
                    continue
                state = state_of_job(details.status)
                try:  # the run's files, from its storage: a disk, or an object store that may not answer
                    written = state == RunState.RUNNING and model_written_ns(run.run_dir) not in (None, earlier_model)
                    model = model_folder(run.run_dir) if written or state == RunState.SUCCEEDED else None
                    lines, progress = list(metrics.read()), read_progress(run.run_dir)
                    baseline = read_baseline(run.run_dir) if state.ended else None
                    unread = 0
                except Exception as error:  # botocore's connection and credential errors are not OSErrors
                    unread += 1
                    if unread > retries:
                        raise StorageError(
                            f"{unreachable_storage(str(run.run_dir), error)}. The run goes on: follow it again "
                            f"with `napari-raysam runs follow {name}`"
                        ) from error
                    yield RunUpdate(
                        lifecycle.state, metrics.lines, progress, "", _elapsed(details.start_time, details.end_time),
                        message=f"cannot read the run's files in {run.run_dir}; retrying ({unread}/{retries})",
                    )
                    time.sleep(min(2.0**unread, 10.0))
                    continue
                message = ""
                if state == RunState.SUCCEEDED and model is None:
                    state, message = RunState.FAILED, f"the job ended without writing a model into {run.run_dir}"
                lifecycle.advance(state)
                if lifecycle.state.ended:
                    tail.finish()
                    if lifecycle.state == RunState.FAILED:
                        message = self._failure_message(run, details.message or message, tail)
                        if metrics.lines:  # a checkpoint for each epoch line (written after it is stored)
                            message += (
                                f"\nits {len(metrics.lines)} finished epochs are kept: continue it with "
                                f"`napari-raysam runs resume {run.name}`"
                            )
                update = RunUpdate(
                    state=lifecycle.state,
                    metrics=lines,
                    progress=progress,
                    new_log=tail.take(),
                    elapsed_s=_elapsed(details.start_time, details.end_time),
                    model=model,
                    message=message,
                    baseline=baseline,
                )
                key = (update.state, len(update.metrics), json.dumps(update.progress), update.model)
                if update.new_log or key != last or lifecycle.state.ended:
                    yield update
                last = key
                if lifecycle.state.ended:
                    return
                time.sleep(poll_s)
        finally:
            tail.close()

    def wait(self, name: str, on_update: Callable[[RunUpdate], None] | None = None, poll_s: float = 1.0) -> Path:
        """Follow the run to its end; returns its model folder.

        Raises:
            RunFailed: the run failed or was stopped.
        """
        for update in self.follow(name, poll_s=poll_s):
            if on_update is not None:
                on_update(update)
            if update.state == RunState.SUCCEEDED:
                return update.model
            if update.state.ended:
                raise RunFailed(update.message or f"run '{name}' was stopped before it finished")
        raise AssertionError("follow ended without an end state")

    # -- helpers ----------------------------------------------------------------------------------
    def _with_reachable_data(self, config: TrainConfig) -> TrainConfig:
        """``config`` with a dataset the cluster can read: a local dataset goes into the storage when
        the storage is an object store or the cluster is not this machine's."""
        if is_uri(config.data) or (self.cluster.is_local and not is_uri(config.storage)):
            return config
        fingerprint = open_dataset(config.data).fingerprint()
        return dataclasses.replace(config, data=upload_dataset(Path(config.data), fingerprint, config.storage))

    def _with_launcher(self, config: TrainConfig, resumed: bool) -> TrainConfig:
        """``config`` with its launcher decided. ``auto`` trains one worker in the job's driver on a cluster
        started on this computer (Ray Train's chain of processes cost seconds there and buys nothing for
        one worker on one machine), in Ray Train workers otherwise; a ``resumed`` run trains the way it
        started, where its checkpoints are (the run's ``config.json`` keeps the choice)."""
        if config.launcher != "auto":
            return config
        if resumed:
            launcher = _launcher_of(config.run_dir)
        else:
            launcher = "driver" if self.cluster.is_local and config.workers == 1 else "ray-train"
        return dataclasses.replace(config, launcher=launcher)

    def _latest_jobs(self) -> dict[str, RunInfo]:
        """Run name -> the newest of its jobs, for this project's jobs only."""
        try:
            jobs = self._jobs.list_jobs()
        except RuntimeError as error:
            raise RunError(_plain_job_error(error, "", self.cluster)) from error
        latest: dict[str, RunInfo] = {}
        for job in jobs:
            metadata = job.metadata or {}
            if metadata.get("app") != APP or not job.submission_id:
                continue
            run = RunInfo(
                name=metadata.get("run_name", job.submission_id),
                job_id=job.submission_id,
                state=state_of_job(job.status),
                run_dir=location(metadata.get("run_dir", "")),
                base_model=metadata.get("base_model", ""),
                mode=metadata.get("mode", ""),
                images=int(metadata["images"]) if metadata.get("images") else None,
                message=job.message or "",
                start_time=job.start_time / 1000 if job.start_time else None,
                end_time=job.end_time / 1000 if job.end_time else None,
            )
            previous = latest.get(run.name)
            if previous is None or (run.start_time or 0) >= (previous.start_time or 0):
                latest[run.name] = run
        return latest

    def _failure_message(self, run: RunInfo, reason: str, tail: LogTail) -> str:
        log = tail.tail(KEPT_LINES).splitlines()
        if not log:  # the log stream was not to be had: ask once for the whole log
            try:
                log = self._jobs.get_job_logs(run.job_id).rstrip().splitlines()
            except (RuntimeError, OSError):
                log = ["(the log could not be read)"]
        last = "\n".join(log[-30:])
        return f"run '{run.name}' failed: {_plain_reason(reason, log)}\nlast lines of its log:\n{last}"


def _launcher_of(run_dir: Location) -> str:
    """How the run in ``run_dir`` trained, so that a resume finds its checkpoints (Ray Train's folders, or
    the driver's ``resume_state.pt``). Runs from before the driver launcher, and ``auto`` as the job's
    driver reads it, trained under Ray Train."""
    launcher = json.loads((run_dir / CONFIG_FILE).read_text()).get("launcher", "ray-train")
    return "ray-train" if launcher == "auto" else launcher


def _plain_reason(reason: str, log: list[str]) -> str:
    """Why a job failed, in plain words: the driver's own ``error: ...`` line (``python -m backend``
    says so what it knows, such as a storage that refused a checkpoint), else Ray's reason without the log
    it appends (shown apart) and with a killed driver said so."""
    said = [line.removeprefix(_DRIVER_ERROR) for line in log if line.startswith(_DRIVER_ERROR)]
    if said:
        return said[-1]
    reason = reason.split(", last available logs", 1)[0].strip()
    code = re.search(r"exit code (-\d+)", reason)
    if code is not None:  # a negative exit code: the driver process ended by a signal
        number = -int(code.group(1))
        name = signal.Signals(number).name if number in signal.valid_signals() else f"signal {number}"
        return (
            f"its training driver process was killed ({name}): by the system when memory ran out, by a node "
            "that went away, or by hand"
        )
    return reason or "no reason given"


def _elapsed(start_ms: int | None, end_ms: int | None) -> float:
    if not start_ms:
        return 0.0
    end = end_ms / 1000 if end_ms else time.time()
    return max(0.0, end - start_ms / 1000)


def _plain_job_error(error: RuntimeError, name: str, cluster: Cluster) -> str:
    """Ray's HTTP-flavoured job errors, said in plain words."""
    text = str(error)
    if "already exists" in text:
        return f"a run named '{name}' already exists on {cluster.dashboard_url}: choose another run name"
    if "does not exist" in text or "404" in text:
        return (
            f"there is no run named '{name}' on {cluster.dashboard_url}: "
            "`napari-raysam runs list` shows the runs there"
        )
    if "401" in text or "403" in text or "nauthori" in text:
        return f"the cluster at {cluster.dashboard_url} refused the token: check --token / RAY_AUTH_TOKEN"
    if _AGENT_NOT_READY in text:
        return (
            f"the cluster at {cluster.dashboard_url} is up but its job agent did not start within "
            f"{AGENT_WAIT_S} s: try again in a minute, or restart the cluster"
        )
    return f"the cluster at {cluster.dashboard_url} answered: {text}"
