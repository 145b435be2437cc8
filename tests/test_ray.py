"""Integration with a real Ray cluster on 127.0.0.1: Ray Jobs, Ray Train with 2 workers, resume.

The cluster is this test session's own: started with ``ray start`` through
``napari_raysam.cluster`` and stopped by the ids of the processes it started.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest

from backend.config import TrainConfig
from backend.models import load_model
from napari_raysam import cluster as clusters
from napari_raysam.auth import is_loopback_host
from napari_raysam.cli import main
from napari_raysam.runs import MetricsReader, RunClient, RunFailed, RunState, read_progress

pytestmark = pytest.mark.ray

SMALL = {"model": "random:tiny", "n_objects_per_batch": 2, "n_sub_iteration": 2, "patch_shape": (96, 96)}


def submit(cluster, cell_dataset, tmp_path, **overrides) -> TrainConfig:
    config = TrainConfig(data=str(cell_dataset), storage=str(tmp_path / "runs"), **{**SMALL, **overrides})
    assert RunClient(cluster).submit(config).name == config.run_name
    return config


def test_two_workers_train_and_export(ray_cluster, cell_dataset, tmp_path):
    submitted = time.time()
    config = submit(ray_cluster, cell_dataset, tmp_path, workers=2, epochs=2)
    updates = []
    model = RunClient(ray_cluster).wait(config.run_name, on_update=updates.append, poll_s=0.5)

    assert (model / "meta.json").exists() and (model / "model.safetensors").exists()
    log = "".join(update.new_log for update in updates)
    assert "world_size=2" in log
    assert log.count("world_size=2") == 1  # the log arrives once, not re-read on every poll
    # one PyTorch thread per reserved CPU, whatever OMP_NUM_THREADS Ray inherited (conftest: 2): 2 x 2 threads
    # on 2 cores trained an epoch ~4x slower
    assert set(re.findall(r"rank (\d) of 2 on Ray node \w+ \(PyTorch threads: 1\)", log)) == {"0", "1"}, log
    assert [m["epoch"] for m in MetricsReader(config.run_dir).read()] == [0, 1]
    progress = read_progress(config.run_dir)
    assert progress["epoch"] == 1 and progress["step"] == progress["steps_per_epoch"]
    states = [update.state for update in updates]
    assert states[-1] == RunState.SUCCEEDED and RunState.RUNNING in states
    assert states.index(RunState.RUNNING) < states.index(RunState.SUCCEEDED)
    # run files are readable by the group of a shared storage folder, not only by their owner
    for name in ("config.json", "metrics.jsonl", "progress.json", "model/meta.json", "model/model.safetensors"):
        assert (config.run_dir / name).stat().st_mode & 0o040, name
    fetched = tmp_path / "fetched"
    assert main(["runs", "fetch", config.run_name, "-o", str(fetched),
                 "--address", ray_cluster.dashboard_url, "--token", ray_cluster.token]) == 0
    assert load_model(fetched).meta["mode"] == "decoder"
    # on a desktop cluster Ray Train starts no preemption watcher (one process fewer before the first step)
    started = _actors_started(ray_cluster, since=submitted)
    assert "RayTrainWorker" in started and "PreemptionWatcher" not in started


def test_one_worker_on_the_embedded_cluster_trains_in_the_jobs_driver(ray_cluster, cell_dataset, tmp_path):
    """One worker on this computer needs no Ray Train: the job's driver trains, with the worker's CPUs reserved,
    so a second run waits for them instead of sharing the cores."""
    submitted = time.time()
    client = RunClient(ray_cluster)
    first = submit(ray_cluster, cell_dataset, tmp_path, epochs=500, cpus_per_worker=2)  # the cluster's 2 CPUs
    deadline = time.monotonic() + 120
    while read_progress(first.run_dir) is None:
        assert time.monotonic() < deadline, "the first run did not start training"
        time.sleep(0.2)
    # at a Ray worker's niceness, as a Ray Train worker would be: napari beside it keeps the cores first
    assert psutil.Process(_driver_pid(ray_cluster, first.run_name)).nice() == 15
    second = submit(ray_cluster, cell_dataset, tmp_path, epochs=2, cpus_per_worker=2)
    time.sleep(3)
    assert client.info(second.run_name).state == RunState.PENDING
    assert client.stop(first.run_name)
    model = client.wait(second.run_name, poll_s=0.5)
    assert load_model(model).meta["mode"] == "decoder"
    assert [m["epoch"] for m in MetricsReader(second.run_dir).read()] == [0, 1]
    assert json.loads((second.run_dir / "config.json").read_text())["launcher"] == "driver"  # a resume does the same
    started = _actors_started(ray_cluster, since=submitted)
    assert not started & {"TrainController", "RayTrainWorker"}, started


def test_two_vit_t_workers_at_the_decoder_defaults_hold_at_most_two_gigabytes_each(ray_cluster, cell_dataset, tmp_path):
    """A biologist's laptop runs napari beside the training: each of two workers stays within 2 GB
    (micro-sam's recipe held ~10 GB per worker, and Ray's memory monitor killed such runs here)."""
    config = TrainConfig(data=str(cell_dataset), storage=str(tmp_path / "runs"), model="random:vit_t",
                         workers=2, epochs=1)
    assert RunClient(ray_cluster).submit(config).name == config.run_name
    peaks: dict[int, float] = {}
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            for process in clusters.local_cluster_processes(ray_cluster):
                try:
                    if "RayTrainWorker" in " ".join(process.cmdline()):
                        peaks[process.pid] = max(peaks.get(process.pid, 0.0), process.memory_info().rss / 1e9)
                except psutil.Error:  # a worker that ended between listing and reading
                    continue
            time.sleep(0.1)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        RunClient(ray_cluster).wait(config.run_name, poll_s=0.5)
    finally:
        done.set()
        watcher.join()
    assert len(peaks) >= 2, peaks  # the two workers (an earlier test's may still be exiting)
    assert max(peaks.values()) <= 2.0, f"peak resident memory per worker (GB): {peaks}"


def test_two_workers_train_full_mode_on_crops_with_a_distributed_sampler(ray_cluster, cell_dataset, tmp_path):
    config = submit(ray_cluster, cell_dataset, tmp_path, mode="full", workers=2, epochs=2, samples_per_epoch=4)
    updates = []
    model = RunClient(ray_cluster).wait(config.run_name, on_update=updates.append, poll_s=0.5)
    log = "".join(update.new_log for update in updates)
    assert "world_rank=0" in log and "world_rank=1" in log
    assert [m["epoch"] for m in MetricsReader(config.run_dir).read()] == [0, 1]
    progress = read_progress(config.run_dir)
    assert progress["steps_per_epoch"] == 2  # 4 crops an epoch, shared by the DistributedSampler of 2 ranks
    assert load_model(model).meta["mode"] == "full"


def _actors_started(cluster, since: float) -> set[str]:
    """The classes of the actors the cluster's worker processes started after ``since`` ran (their log files)."""
    names = set()
    for log in Path(cluster.temp_dir, "session_latest", "logs").glob("worker-*.out"):
        if log.stat().st_ctime < since:  # an earlier test's job on the shared cluster
            continue
        names.update(line.split(":actor_name:", 1)[1].strip()
                     for line in log.read_text(errors="replace").splitlines() if ":actor_name:" in line)
    return names


def _pids_running(cluster, *parts: str) -> list[int]:
    """The cluster's processes whose command line holds every one of ``parts``."""
    pids = []
    for process in clusters.local_cluster_processes(cluster):
        try:
            command = " ".join(process.cmdline())
        except psutil.Error:  # ended (or a zombie) since it was listed
            continue
        if all(part in command for part in parts):
            pids.append(process.pid)
    return pids


def _driver_pid(cluster, run_name: str) -> int:
    """The job's driver: the process running ``python -m backend train`` for ``run_name`` (a driver that
    trains itself never connects to Ray, so Ray's job info does not name it)."""
    pids = _pids_running(cluster, "backend train", f'"run_name": "{run_name}"')
    assert pids, f"no driver process of run {run_name}"
    return pids[0]


def _train_worker_pids(cluster) -> list[int]:
    return _pids_running(cluster, "RayTrainWorker")


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
    model = RunClient(ray_cluster).wait(config.run_name, on_update=updates.append, poll_s=0.5)
    log = "".join(update.new_log for update in updates)
    assert "resuming after epoch" in log  # the restarted workers loaded a checkpoint
    assert not set(victims[1:]) & set(_train_worker_pids(ray_cluster))
    epochs = [m["epoch"] for m in MetricsReader(config.run_dir).read()]
    assert epochs == list(range(6))  # nothing lost, nothing trained twice in the record
    meta = json.loads((model / "meta.json").read_text())
    assert [m["epoch"] for m in meta["metrics"]["epochs"]] == list(range(6))


@pytest.mark.parametrize("launcher", ["driver", "ray-train"])
def test_a_killed_driver_fails_the_run_plainly_and_resume_continues_from_its_checkpoint(
    ray_cluster, cell_dataset, tmp_path, capsys, launcher
):
    config = submit(ray_cluster, cell_dataset, tmp_path, epochs=6, launcher=launcher)
    client = RunClient(ray_cluster)
    metrics = MetricsReader(config.run_dir)
    deadline = time.monotonic() + 300
    while not metrics.read():  # a metrics line is written once its epoch's checkpoint is stored
        assert time.monotonic() < deadline, "no epoch finished"
        time.sleep(0.1)
    os.kill(_driver_pid(ray_cluster, config.run_name), signal.SIGKILL)

    resume_hint = f"continue it with `napari-raysam runs resume {config.run_name}`"
    with pytest.raises(RunFailed, match=f"(?s)failed: its training driver process was killed \\(SIGKILL\\).*{resume_hint}"):
        client.wait(config.run_name, poll_s=0.5)
    kept = len(MetricsReader(config.run_dir).read())
    assert 1 <= kept < 6
    address = ["--address", ray_cluster.dashboard_url, "--token", ray_cluster.token]
    assert main(["runs", "resume", config.run_name, *address]) == 0
    out, err = capsys.readouterr()
    assert f"resumed run {config.run_name} as job {config.run_name}-resume-" in out
    # from the last stored checkpoint, not from the start (one stored just before the kill may be newer than
    # the last line, and Ray may not have registered it yet: our own record of the run folder finds it)
    assert int(re.search(r"resuming after epoch (\d+)", err).group(1)) >= kept - 1, err[-2000:]
    assert [m["epoch"] for m in MetricsReader(config.run_dir).read()] == list(range(6))
    assert client.info(config.run_name).state == RunState.SUCCEEDED


def test_a_run_from_before_the_launcher_setting_resumes_under_ray_train_from_its_checkpoint(
    ray_cluster, cell_dataset, tmp_path
):
    config = submit(ray_cluster, cell_dataset, tmp_path, epochs=2, launcher="ray-train")
    client = RunClient(ray_cluster)
    client.wait(config.run_name, poll_s=0.5)
    stored = json.loads((config.run_dir / "config.json").read_text())
    del stored["launcher"]  # as an earlier version wrote it
    (config.run_dir / "config.json").write_text(json.dumps(stored))
    client.resume(config.run_name, epochs=3)
    updates = []
    client.wait(config.run_name, on_update=updates.append, poll_s=0.5)
    assert "resuming after epoch 1" in "".join(update.new_log for update in updates)
    assert [m["epoch"] for m in MetricsReader(config.run_dir).read()] == [0, 1, 2]


def test_a_detached_job_can_be_stopped_and_following_it_says_so(ray_cluster, cell_dataset, tmp_path, capsys):
    address = ["--address", ray_cluster.dashboard_url, "--token", ray_cluster.token]
    storage = tmp_path / "runs"
    train = ["train", "--data", str(cell_dataset), "--storage", str(storage), "--model", "random:tiny",
             "--epochs", "50", "--run-name", "to-stop", "--detach", *address]
    assert main(train) == 0
    assert "submitted run to-stop" in capsys.readouterr().out
    assert main(["runs", "list", *address]) == 0
    assert "to-stop\t" in capsys.readouterr().out
    assert main(["runs", "stop", "to-stop", *address]) == 0
    assert main(["runs", "follow", "to-stop", *address]) == 2
    err = capsys.readouterr().err
    assert "\nerror: run 'to-stop' was stopped" in err  # after the job's log

    # the name is taken now: reusing it neither resumes nor re-exports the old run silently
    assert main(train) == 2
    assert "a run named 'to-stop' already exists" in capsys.readouterr().err
    for verb in ("follow", "stop", "fetch"):
        assert main(["runs", verb, "no-such-run", *address, *(["-o", str(tmp_path / "m")] if verb == "fetch" else [])]) == 2
        err = capsys.readouterr().err
        assert "there is no run named 'no-such-run'" in err and "Traceback" not in err


def test_a_run_stopped_as_it_starts_leaves_no_driver_behind(ray_cluster, cell_dataset, tmp_path):
    """Cancel pressed while the run is pending: Ray stops the job while its entrypoint starts. Once,
    its shell was signalled before it forked the driver, which trained on, orphaned, holding the CPUs."""
    client = RunClient(ray_cluster)
    for attempt in range(3):  # the race is at the moment the entrypoint starts: give it a few chances
        config = submit(ray_cluster, cell_dataset, tmp_path, epochs=500, run_name=f"stopped-at-once-{attempt}")
        client.stop(config.run_name)
        deadline = time.time() + 60
        while not client.info(config.run_name).state.ended and time.time() < deadline:
            time.sleep(0.2)
        assert client.info(config.run_name).state == RunState.STOPPED
        time.sleep(3)  # a leaked driver would be training by now
        leftovers = [
            process.pid for process in psutil.process_iter(["cmdline"])
            if any(config.run_name in part for part in process.info["cmdline"] or [])
        ]
        assert leftovers == [], f"processes of the stopped run {config.run_name} still run"


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


def test_the_embedded_cluster_is_reused_and_stopped_by_its_own_processes(capsys):
    """Reused while it answers; `napari-raysam cluster stop` stops its processes, even once its dashboard
    has died (then nothing answers, and the rest of it ran on, holding memory, with no verb to stop it).
    Meanwhile no second cluster is started beside it: that left the first one's processes unrecorded."""
    first = clusters.start_local_cluster(num_cpus=1)
    try:
        started = {p.pid for p in clusters.local_cluster_processes(first)}
        again = clusters.start_local_cluster(num_cpus=1)
        assert again.dashboard_url == first.dashboard_url  # reused, not a second cluster
        listening = {
            c.laddr.ip for c in psutil.net_connections("inet")
            if c.status == psutil.CONN_LISTEN and c.pid in started
        }
        assert listening and all(is_loopback_host(ip) for ip in listening), listening
        [dashboard] = [psutil.Process(pid) for pid in _pids_running(first, "dashboard/dashboard.py")]
        dashboard.kill()
        psutil.wait_procs([dashboard], timeout=10)
        assert clusters.running_local_cluster() is None  # it no longer answers
        with pytest.raises(clusters.ClusterError, match="does not answer.*napari-raysam cluster stop"):
            clusters.start_local_cluster(num_cpus=1)  # not a second cluster beside the one that runs on
        assert clusters.recorded_local_cluster().temp_dir == first.temp_dir
        assert main(["cluster", "stop"]) == 0
        assert re.fullmatch(r"stopped \d+ processes\n", capsys.readouterr().out)
    finally:
        clusters.stop_local_cluster(first)
    assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE for pid in started)
    assert main(["cluster", "stop"]) == 0
    assert capsys.readouterr().out == "no local Ray cluster running\n"
