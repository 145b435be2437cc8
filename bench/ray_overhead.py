"""Ray's overhead per epoch against the plain PyTorch loop, on the same data and the same cores.

The same decoder-mode run of random vit_t on the demo's HeLa training frames, seven ways:
- plain: ``python -m backend train --no-ray`` (our fine-tuner in one process, 2 PyTorch threads,
  the epoch state saved to the run folder as a Ray checkpoint is);
- Ray Train, 1 worker with 2 CPUs, on a fresh embedded cluster;
- Ray Train, 2 workers with 1 CPU each (DDP over gloo), same cluster;
- the job's driver training itself (``launcher="driver"``, the embedded default for 1 worker), 2 CPUs;
- Ray Train, 2 workers with 1 CPU each on 2 nodes of this machine (a 1-CPU head and a 1-CPU node
  joined with ``napari_raysam.cluster.add_local_node``): DDP between nodes over 127.0.0.1;
- and, to part Ray Train's own cost from the cores it shares with Ray's processes, the plain loop
  with 1 thread against Ray Train's 1 worker with 1 CPU (Ray gives it 1 thread).
The 2-thread plain run goes first and last, so drift in the machine's speed shows. An epoch's time is the
time between two consecutive ``metrics.jsonl`` lines (each written once its epoch is validated and
its checkpoint stored), polled every 20 ms; epoch 0 also holds the start, so it is left out. The
trainer's own time for the epoch (``elapsed_s`` of its line) is printed beside it: the rest is
what happens between epochs (checkpoint, report, the metrics line).

    .venv/bin/python bench/ray_overhead.py /tmp/ray-overhead [--epochs 6]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # every Ray port on 127.0.0.1
os.environ.pop("OMP_NUM_THREADS", None)  # Ray gives each worker as many threads as it has CPUs


def epoch_times(run_dir: Path, epochs: int, ended) -> tuple[list[float], list[float]]:
    """(seconds between consecutive metrics lines, the trainer's seconds per epoch), epochs 1 on."""
    arrived: list[float] = []
    lines: list[dict] = []
    metrics = run_dir / "metrics.jsonl"
    deadline, size, next_check = time.monotonic() + 1800, -1, 0.0
    while len(arrived) < epochs:
        now = time.monotonic()
        if now > next_check:  # the job's state every 2 s only: asking the dashboard takes CPU from the run
            if now > deadline or ended():
                raise RuntimeError(f"the run in {run_dir} ended after {len(arrived)} of {epochs} epochs")
            next_check = now + 2.0
        if metrics.exists() and metrics.stat().st_size != size:  # a stat, not a read, every 20 ms
            text = metrics.read_text()
            size = len(text.encode())
            complete = [json.loads(line) for line in text.splitlines() if line.endswith("}")]
            for line in complete[len(arrived):]:
                arrived.append(now)
                lines.append(line)
        time.sleep(0.02)
    between = [b - a for a, b in zip(arrived, arrived[1:])]
    return between, [line["elapsed_s"] for line in lines[1:]]


def summary(name: str, between: list[float], trainer: list[float]) -> dict:
    return {
        "run": name, "epoch_s_median": round(statistics.median(between), 2),
        "trainer_s_median": round(statistics.median(trainer), 2),
        "epoch_s": [round(s, 2) for s in between], "trainer_s": [round(s, 2) for s in trainer],
    }


def plain(config, epochs: int, threads: int) -> dict:
    process = subprocess.Popen(
        [sys.executable, "-m", "backend", "train", "--no-ray", "--config", config.to_json()],
        env={**os.environ, "OMP_NUM_THREADS": str(threads)}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        cwd=Path(__file__).resolve().parents[1],
    )
    try:
        result = summary(f"plain PyTorch loop ({threads} threads)", *epoch_times(config.run_dir, epochs, lambda: process.poll() is not None))
    finally:
        process.wait()
    return result


def with_ray(client, config, epochs: int, where: str = "") -> dict:
    client.submit(config)
    between, trainer = epoch_times(config.run_dir, epochs, lambda: client.info(config.run_name).state.ended)
    client.wait(config.run_name, poll_s=0.5)
    who = "Ray Train" if config.launcher == "ray-train" else "the job's driver"
    return summary(f"{who}, {config.workers} worker(s) x {config.cpus_per_worker} CPU{where}", between, trainer)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", nargs="?", default="/tmp/ray-overhead", type=Path)
    parser.add_argument("--epochs", type=int, default=6)
    args = parser.parse_args()
    folder = args.folder.resolve()
    os.environ["NAPARI_RAYSAM_HOME"] = str(folder / "home")
    from backend.config import TrainConfig
    from common import hela_dataset, machine
    from napari_raysam.cluster import add_local_node, start_local_cluster, stop_local_cluster
    from napari_raysam.runs import RunClient

    print(machine(), "| load:", os.getloadavg(), flush=True)
    data = hela_dataset(folder)

    def config(name: str, **layout) -> TrainConfig:  # one storage: the embeddings are computed once
        return TrainConfig(data=str(data), storage=str(folder / "runs"), model="random:vit_t", mode="decoder",
                           epochs=args.epochs, run_name=f"{name}-{int(time.time())}", **{"launcher": "ray-train", **layout})

    two_threads = [plain(config("plain"), args.epochs, threads=2)]
    one_thread = [plain(config("plain1"), args.epochs, threads=1)]
    cluster = start_local_cluster(num_cpus=2)
    try:
        client = RunClient(cluster)
        two_threads.append(with_ray(client, config("ray1", workers=1, cpus_per_worker=2), args.epochs))
        two_threads.append(with_ray(client, config("ray2", workers=2, cpus_per_worker=1), args.epochs))
        one_thread.append(with_ray(client, config("ray1x1", workers=1, cpus_per_worker=1), args.epochs))
        two_threads.append(
            with_ray(client, config("driver1", workers=1, cpus_per_worker=2, launcher="driver"), args.epochs)
        )
    finally:
        stop_local_cluster(cluster)
    cluster = start_local_cluster(num_cpus=1)  # and a second node of 1 CPU: one worker on each
    try:
        add_local_node(cluster, num_cpus=1)
        two_threads.append(
            with_ray(RunClient(cluster), config("nodes2", workers=2, cpus_per_worker=1), args.epochs, ", 2 nodes")
        )
    finally:
        stop_local_cluster(cluster)
    two_threads.append(plain(config("plain-again"), args.epochs, threads=2))
    for results in (two_threads, one_thread):  # each Ray run against the plain loop with as many threads in all
        plains = [result["epoch_s_median"] for result in results if result["run"].startswith("plain")]
        for result in results:
            result["vs_plain"] = round(result["epoch_s_median"] / statistics.mean(plains), 3)
            print(json.dumps(result), flush=True)
    print("load after:", os.getloadavg())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
