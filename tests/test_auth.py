"""Auth and transport of the embedded cluster: its token, its ports, and tokens sent in the clear."""

from __future__ import annotations

import logging
import os
import time

import pytest
from ray.job_submission import JobStatus, JobSubmissionClient

from backend import atomic
from napari_raysam import auth
from napari_raysam import cluster as clusters
from ray_processes import listening_sockets, or_empty

# A job whose driver and one worker stay up until it is stopped, so their sockets can be listed.
HOLDING_JOB = (
    "python -c \"import time, ray; ray.init(); "
    "ray.get(ray.remote(lambda: 1).remote()); print('ready', flush=True); time.sleep(120)\""
)


def _wait_for(client: JobSubmissionClient, job_id: str, done, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not done(client, job_id):
        status = client.get_job_status(job_id)
        assert not status.is_terminal() or done(client, job_id), client.get_job_logs(job_id)
        assert time.monotonic() < deadline, f"job {job_id} is {status}: {client.get_job_logs(job_id)}"
        time.sleep(0.5)


@pytest.mark.ray
def test_the_embedded_cluster_starts_and_runs_jobs_when_ray_auth_token_is_set(monkeypatch):
    # a user's RAY_AUTH_TOKEN is usually for another cluster; it must not break the embedded one
    monkeypatch.setenv("RAY_AUTH_TOKEN", "the-token-of-some-other-cluster")
    cluster = clusters.start_local_cluster(num_cpus=1, timeout=60)
    try:
        assert clusters.check(cluster)["version"]
        client = JobSubmissionClient(cluster.dashboard_url, headers=cluster.headers)
        job_id = client.submit_job(entrypoint="python -c \"import ray; ray.init(); print(ray.get(ray.remote(lambda: 41 + 1).remote()))\"")
        _wait_for(client, job_id, lambda c, j: c.get_job_status(j) == JobStatus.SUCCEEDED)
        assert "42" in client.get_job_logs(job_id)
        assert (clusters.state_dir() / "auth_token").stat().st_mode & 0o777 == 0o600  # owner-only
    finally:
        clusters.stop_local_cluster(cluster)


@pytest.mark.ray
def test_every_port_of_the_embedded_cluster_is_on_loopback_with_a_job_running(ray_cluster):
    client = JobSubmissionClient(ray_cluster.dashboard_url, headers=ray_cluster.headers)
    job_id = client.submit_job(entrypoint=HOLDING_JOB)
    try:
        _wait_for(client, job_id, lambda c, j: "ready" in c.get_job_logs(j))
        processes = clusters.local_cluster_processes(ray_cluster)
        driver = {p.pid for p in processes if "print('ready'" in " ".join(or_empty(p.cmdline)) and p.name().startswith("python")}
        listening = listening_sockets(processes)
        names = {name for _, _, name in listening}
        assert {"gcs_server", "raylet", "ray::IDLE"} <= names, names  # head, node and the job's worker were found
        assert driver, "the job's driver is not among the cluster's processes, so its sockets went unchecked"
        assert all(auth.is_loopback_host(ip) for ip, _, _ in listening), [s for s in listening if not auth.is_loopback_host(s[0])]
    finally:
        client.stop_job(job_id)
        _wait_for(client, job_id, lambda c, j: c.get_job_status(j).is_terminal())


def test_token_files_are_owner_only_from_the_first_byte(tmp_path):
    path = tmp_path / "auth_token"
    modes = []
    previous = os.umask(0)  # even a permissive umask must not open a window
    try:
        atomic.write_file(path, lambda file: (modes.append(os.fstat(file.fileno()).st_mode & 0o777), file.write(b"s3cret")),
                          mode=atomic.PRIVATE_MODE)
    finally:
        os.umask(previous)
    assert modes == [0o600]
    assert path.stat().st_mode & 0o777 == 0o600 and path.read_text() == "s3cret"


@pytest.mark.parametrize("address, warned", [
    ("http://10.1.2.3:8265", True),
    ("http://head.example.org:8265", True),
    ("https://head.example.org:8265", False),
    ("http://127.0.0.1:8265", False),
    ("http://127.8.9.1:8265", False),
    ("http://localhost:8265", False),
    ("http://[::1]:8265", False),
])
def test_a_token_sent_in_the_clear_to_another_host_is_warned_about(address, warned, caplog, monkeypatch):
    monkeypatch.setattr(clusters, "check", lambda cluster, timeout=10.0: {})  # no cluster needed to see the warning
    for variable in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("HOME", "/nonexistent")  # no ~/.ray/auth_token either
    with caplog.at_level(logging.WARNING, logger="napari_raysam"):
        clusters.connect(address, token="s3cret")
        clusters.connect(address)  # no token, nothing to leak
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == (1 if warned else 0), lines
    if warned:
        assert "\n" not in lines[0] and "https" in lines[0] and "port-forward" in lines[0] and "s3cret" not in lines[0]
