"""Integration with a real Ray cluster on 127.0.0.1: Ray Jobs, Ray Train with 2 workers, resume.

The cluster is this test session's own: started with ``ray start`` through
``napari_raysam.cluster`` and stopped by the ids of the processes it started.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import time

import psutil
import pytest

from backend.config import TrainConfig
from napari_raysam import cluster as clusters
from napari_raysam import jobs
from napari_raysam.cli import main

pytestmark = pytest.mark.ray

SMALL = {"model": "random:tiny", "n_objects_per_batch": 2, "n_sub_iteration": 2, "patch_shape": (96, 96)}


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    home = tmp_path_factory.mktemp("ray_state")
    previous = os.environ.get("NAPARI_RAYSAM_HOME")
    os.environ["NAPARI_RAYSAM_HOME"] = str(home)
    try:
        cluster = clusters.start_local_cluster(num_cpus=2)
    finally:
        os.environ.pop("NAPARI_RAYSAM_HOME") if previous is None else os.environ.update(NAPARI_RAYSAM_HOME=previous)
    yield cluster
    clusters.stop_local_cluster(cluster)


def submit(cluster, cell_dataset, tmp_path, **overrides) -> TrainConfig:
    config = TrainConfig(data=str(cell_dataset), storage=str(tmp_path / "runs"), **{**SMALL, **overrides})
    assert jobs.submit_training(cluster, config) == config.run_name
    return config


def test_two_workers_train_and_export(ray_cluster, cell_dataset, tmp_path):
    config = submit(ray_cluster, cell_dataset, tmp_path, workers=2, epochs=2)
    updates = []
    model = jobs.follow(ray_cluster, config.run_name, config.run_dir, on_update=updates.append, poll_s=0.5)

    assert (model / "meta.json").exists() and (model / "model.safetensors").exists()
    log = "".join(update.new_log for update in updates)
    assert "world_size=2" in log
    metrics, progress = jobs.read_run(config.run_dir)
    assert [m["epoch"] for m in metrics] == [0, 1]
    assert progress["epoch"] == 1 and progress["step"] == progress["steps_per_epoch"]
    assert updates[-1].status == "SUCCEEDED"


def _train_worker_pids(cluster) -> list[int]:
    pids = []
    for process in clusters.local_cluster_processes(cluster):
        try:
            if "RayTrainWorker" in " ".join(process.cmdline()):
                pids.append(process.pid)
        except psutil.Error:  # ended (or a zombie) since it was listed
            continue
    return pids


def test_training_resumes_from_the_last_checkpoint_after_a_worker_is_killed(ray_cluster, cell_dataset, tmp_path):
    config = submit(ray_cluster, cell_dataset, tmp_path, workers=2, epochs=6, max_failures=2)
    # Ray Train's controller collects reported checkpoints every few seconds; kill once it has one.
    snapshot = config.run_dir / "checkpoint_manager_snapshot.json"
    deadline = time.monotonic() + 300
    while not (snapshot.exists() and "checkpoint_" in snapshot.read_text()):
        assert time.monotonic() < deadline, "no checkpoint was registered"
        time.sleep(0.2)
    victims = _train_worker_pids(ray_cluster)
    assert len(victims) == 2
    os.kill(victims[1], signal.SIGKILL)

    updates = []
    model = jobs.follow(ray_cluster, config.run_name, config.run_dir, on_update=updates.append, poll_s=0.5)
    log = "".join(update.new_log for update in updates)
    assert "resuming after epoch" in log  # the restarted workers loaded a checkpoint
    assert not set(victims[1:]) & set(_train_worker_pids(ray_cluster))
    epochs = [m["epoch"] for m in jobs.read_run(config.run_dir)[0]]
    assert epochs == list(range(6))  # nothing lost, nothing trained twice in the record
    meta = json.loads((model / "meta.json").read_text())
    assert [m["epoch"] for m in meta["metrics"]["epochs"]] == list(range(6))


def test_a_detached_job_can_be_stopped_and_following_it_says_so(ray_cluster, cell_dataset, tmp_path, capsys):
    address = ["--address", ray_cluster.dashboard_url, "--token", ray_cluster.token]
    storage = tmp_path / "runs"
    train = ["train", "--data", str(cell_dataset), "--storage", str(storage), "--model", "random:tiny",
             "--epochs", "50", "--run-name", "to-stop", "--detach", *address]
    assert main(train) == 0
    assert "submitted job to-stop" in capsys.readouterr().out
    assert main(["stop", "to-stop", *address]) == 0
    assert main(["follow", "to-stop", "--storage", str(storage), *address]) == 2
    err = capsys.readouterr().err
    assert "\nerror: training job to-stop ended as STOPPED" in err  # after the job's log


def test_unreachable_address_says_how_to_fix_it():
    with pytest.raises(clusters.ClusterError, match="cannot reach a Ray cluster at http://127.0.0.1:9"):
        clusters.connect("127.0.0.1:9", timeout=2)


def test_missing_and_wrong_tokens_are_told_apart(ray_cluster, monkeypatch):
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", "/nonexistent")
    monkeypatch.setenv("HOME", "/nonexistent")
    with pytest.raises(clusters.ClusterError, match="requires a token"):
        clusters.connect(ray_cluster.dashboard_url)
    with pytest.raises(clusters.ClusterError, match="rejected the token"):
        clusters.connect(ray_cluster.dashboard_url, token="not-the-token")
    assert clusters.connect(ray_cluster.dashboard_url, token=ray_cluster.token).dashboard_url


def test_ray_client_addresses_are_refused_with_the_alternative():
    with pytest.raises(clusters.ClusterError, match="give the dashboard address"):
        clusters.connect("ray://head:10001")


def _is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    return (getattr(address, "ipv4_mapped", None) or address).is_loopback


def test_the_embedded_cluster_is_reused_and_stopped_by_its_own_processes(monkeypatch, tmp_path):
    first = clusters.start_local_cluster(num_cpus=1)
    try:
        started = {p.pid for p in clusters.local_cluster_processes(first)}
        again = clusters.start_local_cluster(num_cpus=1)
        assert again.dashboard_url == first.dashboard_url  # reused, not a second cluster
        listening = {
            c.laddr.ip for c in psutil.net_connections("inet")
            if c.status == psutil.CONN_LISTEN and c.pid in started
        }
        assert listening and all(_is_loopback(ip) for ip in listening), listening
    finally:
        clusters.stop_local_cluster(first)
    assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE for pid in started)
    assert clusters.running_local_cluster() is None
