"""Resume after a failure: a killed training worker (Ray Train restarts it) and a killed job driver
(the run fails; ``RunClient.resume`` continues it). Time lost and epochs trained twice.

A 1-worker decoder-mode run of random vit_t on the demo's HeLa training frames on a fresh
embedded cluster, 8 epochs. Each scenario kills its process by id right after the 3rd epoch's
metrics line (so its checkpoint is stored), then prints: seconds from the kill until training
went on (the next ``progress.json`` step), seconds from the kill until the next epoch line, the
epoch it resumed after (from the log), the epochs trained twice, and the epochs in
``metrics.jsonl`` at the end (each once, 0-7, is right).

    OMP_NUM_THREADS=2 .venv/bin/python bench/resume_after_kill.py /tmp/resume-bench
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import time
from pathlib import Path

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # every Ray port on 127.0.0.1

EPOCHS, KILL_AFTER = 8, 3


def _wait(condition, what: str, timeout: float = 600.0):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout:.0f} s for {what}")
        time.sleep(0.05)
    return value


def scenario(client, cluster, train: Path, storage: Path, victim: str) -> dict:
    import psutil

    from backend.config import TrainConfig
    from napari_raysam.cluster import local_cluster_processes
    from napari_raysam.runs import MetricsReader, read_progress

    config = TrainConfig(data=str(train), storage=str(storage), model="random:vit_t", mode="decoder",
                         epochs=EPOCHS, workers=1, cpus_per_worker=2, run_name=f"kill-{victim}-{int(time.time())}",
                         launcher="ray-train")  # Ray Train's recovery is what is measured
    client.submit(config)
    metrics = MetricsReader(config.run_dir)
    _wait(lambda: len(metrics.read()) >= KILL_AFTER, f"{KILL_AFTER} epochs")
    if victim == "worker":
        pid = next(p.pid for p in local_cluster_processes(cluster) if "RayTrainWorker" in " ".join(p.cmdline()))
    else:
        pid = int(client._jobs.get_job_info(config.run_name).driver_info.pid)
    step_before = read_progress(config.run_dir)
    epochs_before = len(metrics.read())
    killed = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    psutil.wait_procs([psutil.Process(pid)] if psutil.pid_exists(pid) else [], timeout=30)
    if victim == "driver":
        _wait(lambda: client.info(config.run_name).state.ended, "the run to fail")
        client.resume(config.run_name)
    _wait(lambda: read_progress(config.run_dir) not in (None, step_before), "a step after the kill")
    going_on = time.monotonic() - killed
    _wait(lambda: any(m["epoch"] >= epochs_before for m in MetricsReader(config.run_dir).read()), "the next epoch")
    next_epoch = time.monotonic() - killed
    client.wait(config.run_name, poll_s=0.5)
    log = client._jobs.get_job_logs(client.info(config.run_name).job_id)  # the job that resumed
    resumed = re.findall(r"resuming after epoch (\d+)", log)
    resumed_after = int(resumed[-1]) if resumed else -1
    return {
        "victim": victim, "killed_after_epochs": epochs_before,
        "training_again_after_s": round(going_on, 1), "next_epoch_after_s": round(next_epoch, 1),
        "resumed_after_epoch": resumed_after, "epochs_trained_twice": epochs_before - 1 - resumed_after,
        "epochs_recorded": [m["epoch"] for m in MetricsReader(config.run_dir).read()],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", nargs="?", default="/tmp/resume-bench", type=Path)
    folder = parser.parse_args().folder.resolve()
    os.environ["NAPARI_RAYSAM_HOME"] = str(folder / "home")
    from common import machine
    from napari_raysam.cluster import start_local_cluster, stop_local_cluster
    from napari_raysam.demo import build_datasets
    from napari_raysam.runs import RunClient

    print(machine(), flush=True)
    train, _ = build_datasets(folder)
    cluster = start_local_cluster()
    try:
        client = RunClient(cluster)
        for victim in ("worker", "driver"):
            print(json.dumps(scenario(client, cluster, train, folder / "runs", victim)), flush=True)
    finally:
        stop_local_cluster(cluster)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
