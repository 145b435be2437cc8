"""The run client's Qt-free parts: lifecycle, incremental reading of run files, history, settings."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from backend.storage import StorageError
from napari_raysam.finetune import FinetuneError, FinetuneSettings
from napari_raysam.runs import MetricsReader, RunLifecycle, RunState, RunUpdate, fetch_model, run_history
from napari_raysam.runs.progress import progress_fraction, progress_text, summary_text
from napari_raysam.runs.state import state_of_job


def epoch_line(epoch: int, val_loss: float, val_iou: float) -> str:
    return json.dumps({"epoch": epoch, "train_loss": 1.0, "val_loss": val_loss, "val_iou": val_iou,
                       "lr": 1e-3, "samples_per_s": 1.0, "elapsed_s": 3.0}) + "\n"


def test_a_run_only_moves_forward_and_an_ended_run_stays_ended():
    run = RunLifecycle()
    assert run.advance(state_of_job("RUNNING")) and run.state == RunState.RUNNING
    assert not run.advance(RunState.PENDING)  # a stale report after a reconnect
    assert run.advance(RunState.STOPPED) and run.state.ended
    assert not run.advance(RunState.RUNNING) and run.state == RunState.STOPPED
    assert RunLifecycle().advance(RunState.FAILED)  # pending runs can fail before they start


def test_metrics_are_read_incrementally_and_a_half_written_line_waits(tmp_path):
    reader = MetricsReader(tmp_path)
    assert reader.read() == []
    path = tmp_path / "metrics.jsonl"
    line = epoch_line(0, 0.9, 0.1)
    path.write_text(line + line[:20])  # the second line is being written
    assert [m["epoch"] for m in reader.read()] == [0]
    with open(path, "w") as file:
        file.write(line + epoch_line(1, 0.8, 0.2))
    assert [m["epoch"] for m in reader.read()] == [0, 1]
    path.write_text(epoch_line(0, 0.7, 0.3))  # rewritten after a resume: shorter
    assert [m["val_loss"] for m in reader.read()] == [0.7]


def test_progress_in_words_and_as_a_fraction():
    pending = RunUpdate(RunState.PENDING, [], None, "", 0.0)
    assert progress_text(pending, 0) == "pending: waiting for the cluster to start it"
    steps = {"epoch": 1, "epochs": 4, "step": 5, "steps_per_epoch": 10, "elapsed_s": 30.0, "budget_s": None}
    running = RunUpdate(RunState.RUNNING, [], steps, "", 75.0)
    assert progress_text(running, 75) == "running: epoch 2/4, step 5/10, 1:15"
    assert progress_fraction(running, 75) == pytest.approx(15 / 40)
    budget = RunUpdate(RunState.RUNNING, [], {**steps, "budget_s": 60.0}, "", 40.0)
    assert progress_fraction(budget, 40) == pytest.approx(0.5) and "of at most 1:00" in progress_text(budget, 40)


def test_the_history_lists_runs_newest_first_and_fetch_copies_a_model(tmp_path):
    for name, mtime in (("older", 1_000), ("newer", 2_000)):
        run = tmp_path / name
        run.mkdir()
        (run / "config.json").write_text(json.dumps({"model": "random:vit_t", "mode": "decoder", "extra": {"images": 4}}))
        # epoch 3 has the lowest loss, epoch 2 the highest IoU: the model kept is epoch 2's
        (run / "metrics.jsonl").write_text(epoch_line(0, 0.9, 0.1) + epoch_line(1, 0.5, 0.4) + epoch_line(2, 0.4, 0.3))
        os.utime(run / "config.json", (mtime, mtime))
    (tmp_path / "newer" / "model").mkdir()
    (tmp_path / "newer" / "model" / "model.safetensors").write_bytes(b"weights")
    (tmp_path / "newer" / "model" / "meta.json").write_text(json.dumps({"sha256": hashlib.sha256(b"weights").hexdigest()}))
    (tmp_path / "not-a-run").mkdir()

    records = run_history(tmp_path)
    assert [r.name for r in records] == ["newer", "older"]
    assert records[0].val_iou == 0.4 and records[0].images == 4 and records[0].model is not None
    metrics = MetricsReader(tmp_path / "newer").read()
    assert summary_text(metrics, {"val_iou": 0.05, "val_loss": 1.0}) == (
        "validation: IoU 0.050 before training -> 0.400 (kept: epoch 2); loss 1.000 -> 0.500")
    assert records[1].model is None
    assert (fetch_model(tmp_path / "newer", tmp_path / "copy") / "meta.json").exists()
    with pytest.raises(FileNotFoundError, match="has no model yet"):
        fetch_model(tmp_path / "older", tmp_path / "copy2")


def test_settings_persist_without_the_token_and_bad_values_are_refused(tmp_path):
    FinetuneSettings(address="http://head:8265", epochs=3, minutes=5).save(tmp_path / "s.json")
    loaded = FinetuneSettings.load(tmp_path / "s.json")
    assert (loaded.address, loaded.epochs, loaded.minutes) == ("http://head:8265", 3, 5)
    assert "token" not in (tmp_path / "s.json").read_text()
    (tmp_path / "broken.json").write_text("{")
    assert FinetuneSettings.load(tmp_path / "broken.json") == FinetuneSettings()
    with pytest.raises(FinetuneError, match="mode must be"):
        FinetuneSettings(mode="everything")


class _FlakyJobs:
    """A Jobs API stand-in whose status requests fail ``drops`` times (a dropped connection) first."""

    def __init__(self, run_dir, drops: int) -> None:
        import requests

        self.error, self.drops, self.calls = requests.exceptions.ConnectionError("connection reset"), drops, 0
        self.run_dir = run_dir

    def _job(self, status: str):
        from types import SimpleNamespace

        return SimpleNamespace(
            submission_id="r1", status=status, message="", start_time=1_000, end_time=None,
            metadata={"app": "napari-raysam", "run_name": "r1", "run_dir": str(self.run_dir), "mode": "decoder"},
        )

    def list_jobs(self):
        return [self._job("RUNNING")]

    def get_job_info(self, job_id):
        self.calls += 1
        if self.calls <= self.drops:
            raise self.error
        return self._job("SUCCEEDED")

    async def tail_job_logs(self, job_id):
        yield "training...\n"


def test_following_survives_a_dropped_connection(tmp_path, monkeypatch):
    from napari_raysam.cluster import Cluster
    from napari_raysam.runs import RunClient, RunError

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "meta.json").write_text("{}")
    monkeypatch.setattr("napari_raysam.runs.client.time.sleep", lambda seconds: None)
    jobs = _FlakyJobs(tmp_path, drops=2)
    monkeypatch.setattr(RunClient, "_make_jobs_client", lambda self: jobs)
    updates = list(RunClient(Cluster("http://127.0.0.1:1")).follow("r1"))
    assert [u.message for u in updates[:2]] == [f"lost the connection to the cluster; retrying ({k}/30)" for k in (1, 2)]
    assert updates[-1].state == RunState.SUCCEEDED and updates[-1].model == tmp_path / "model"
    assert "training..." in "".join(u.new_log for u in updates)

    jobs = _FlakyJobs(tmp_path, drops=100)
    monkeypatch.setattr(RunClient, "_make_jobs_client", lambda self: jobs)
    with pytest.raises(RunError, match="the run goes on there: follow it again"):
        list(RunClient(Cluster("http://127.0.0.1:1")).follow("r1", retries=3))


def test_following_survives_a_storage_that_does_not_answer_for_a_while(tmp_path, monkeypatch):
    from napari_raysam.cluster import Cluster
    from napari_raysam.runs import RunClient
    from napari_raysam.runs import client as run_client

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "meta.json").write_text("{}")
    monkeypatch.setattr("napari_raysam.runs.client.time.sleep", lambda seconds: None)
    monkeypatch.setattr(RunClient, "_make_jobs_client", lambda self: _FlakyJobs(tmp_path, drops=0))
    outage = {"reads": 2}

    def read_progress(run_dir):  # an object store down for two polls: botocore raises its own errors
        if outage["reads"] > 0:
            outage["reads"] -= 1
            raise RuntimeError("Could not connect to the endpoint URL")
        return None

    monkeypatch.setattr(run_client, "read_progress", read_progress)
    updates = list(RunClient(Cluster("http://127.0.0.1:1")).follow("r1"))
    assert [u.message for u in updates[:2]] == [
        f"cannot read the run's files in {tmp_path}; retrying ({k}/30)" for k in (1, 2)
    ]
    assert updates[-1].state == RunState.SUCCEEDED and updates[-1].model == tmp_path / "model"

    outage["reads"] = 100
    with pytest.raises(StorageError, match="Could not connect.*The run goes on: follow it again"):
        list(RunClient(Cluster("http://127.0.0.1:1")).follow("r1", retries=3))


class _FinishingJobs(_FlakyJobs):
    """A job that writes its model folder on the third status request and ends on the sixth."""

    def __init__(self, run_dir) -> None:
        super().__init__(run_dir, drops=0)

    def get_job_info(self, job_id):
        self.calls += 1
        if self.calls == 3:
            (self.run_dir / "model").mkdir(exist_ok=True)
            (self.run_dir / "model" / "meta.json").write_text(json.dumps({"export": self.calls}))
            os.utime(self.run_dir / "model" / "meta.json", ns=(2_000_000_000, 2_000_000_000))
        return self._job("SUCCEEDED" if self.calls >= 6 else "RUNNING")


@pytest.mark.parametrize("resumed", [False, True])
def test_the_model_is_reported_once_written_before_the_job_ends(resumed, tmp_path, monkeypatch):
    from napari_raysam.cluster import Cluster
    from napari_raysam.runs import RunClient

    if resumed:  # an earlier attempt's model folder is not this job's result
        (tmp_path / "model").mkdir()
        (tmp_path / "model" / "meta.json").write_text("{}")
        os.utime(tmp_path / "model" / "meta.json", ns=(1_000_000_000, 1_000_000_000))
    monkeypatch.setattr("napari_raysam.runs.client.time.sleep", lambda seconds: None)
    jobs = _FinishingJobs(tmp_path)
    monkeypatch.setattr(RunClient, "_make_jobs_client", lambda self: jobs)
    updates = list(RunClient(Cluster("http://127.0.0.1:1")).follow("r1"))
    running = [u for u in updates if u.state == RunState.RUNNING]
    assert running[0].model is None and running[-1].model == tmp_path / "model"
    assert updates[-1].state == RunState.SUCCEEDED and updates[-1].model == tmp_path / "model"


class _StartingJobs(_FlakyJobs):
    """A head whose job agent is not up for the first ``refusals`` submissions (just after ``ray start``)."""

    def __init__(self, run_dir, refusals: int) -> None:
        super().__init__(run_dir, drops=0)
        self.refusals, self.submitted = refusals, 0
        self.jobs: list = []

    def list_jobs(self):
        return self.jobs

    def submit_job(self, **kwargs):
        self.submitted += 1
        if self.submitted <= self.refusals:
            raise RuntimeError("Request failed with status code 500: No available agent to submit job, please try again later.")
        self.jobs = [self._job("PENDING")]


def test_submitting_to_a_head_that_is_still_starting_waits_for_its_job_agent(tmp_path, monkeypatch):
    from backend.config import TrainConfig
    from napari_raysam.cluster import Cluster
    from napari_raysam.runs import RunClient, RunError
    from napari_raysam.runs import client as run_client

    slept: list[float] = []
    monkeypatch.setattr("napari_raysam.runs.client.time.sleep", slept.append)
    config = TrainConfig(data="s3://cells/d.zarr", storage=str(tmp_path / "runs"), model="random:tiny", run_name="r1")
    jobs = _StartingJobs(tmp_path, refusals=3)
    monkeypatch.setattr(RunClient, "_make_jobs_client", lambda self: jobs)
    assert RunClient(Cluster("http://127.0.0.1:1")).submit(config).state == RunState.PENDING
    assert jobs.submitted == 4 and sum(slept) == 3.0

    jobs = _StartingJobs(tmp_path, refusals=1000)
    monkeypatch.setattr(RunClient, "_make_jobs_client", lambda self: jobs)
    with pytest.raises(RunError, match="job agent did not start within 30 s: try again in a minute"):
        RunClient(Cluster("http://127.0.0.1:1")).submit(config)
    assert jobs.submitted == run_client.AGENT_WAIT_S
