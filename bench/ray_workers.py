"""Ray on this machine: time from command to first training step, and 1 vs 2 workers.

Runs the real command line (``napari-raysam train``) against the embedded local Ray:
- cold: no local cluster yet (a fresh state folder), so the command starts one;
- warm: the same command again, reusing the cluster (then once more with 2 workers).
"Time to first step" runs from the command's start until ``progress.json`` reports step 1.
Then decoder-mode vit_t on the real HeLa frames with 1 and with 2 workers (the machine's
cores shared between them); samples/s is the mean over epochs after the first. The
cluster is stopped at the end by the ids of its own processes. ``--omp-threads N`` starts the
cluster from an environment with ``OMP_NUM_THREADS=N``, as a shell or an HPC module may set it.

    .venv/bin/python bench/ray_workers.py [--epochs 3] [--objects 4] [--omp-threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import hela_dataset, machine
from napari_raysam import cluster as clusters


def train_command(data: Path, storage: Path, run_name: str, args, workers: int) -> list[str]:
    return [
        str(Path(sys.executable).parent / "napari-raysam"), "train", "--data", str(data), "--storage", str(storage),
        "--model", "random:vit_t", "--mode", "decoder", "--epochs", str(args.epochs), "--workers", str(workers),
        "--objects-per-batch", str(args.objects), "--run-name", run_name,
    ]


def run(command: list[str], run_dir: Path) -> tuple[float, list[dict]]:
    """Run the command to its end; returns (seconds until step 1 was reported, metrics lines)."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first_step = None
    while process.poll() is None:
        progress = run_dir / "progress.json"
        if first_step is None and progress.exists() and json.loads(progress.read_text())["step"] >= 1:
            first_step = time.perf_counter() - start
        time.sleep(0.1)
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed with exit code {process.returncode}")
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return first_step, metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--objects", type=int, default=4)
    parser.add_argument("--omp-threads", type=int, help="OMP_NUM_THREADS where the cluster starts (default: unset)")
    args = parser.parse_args()
    print(machine())
    work = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    os.environ["NAPARI_RAYSAM_HOME"] = str(work / "state")
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ.pop("OMP_NUM_THREADS", None)
    if args.omp_threads is not None:
        os.environ["OMP_NUM_THREADS"] = str(args.omp_threads)
    data = hela_dataset(work / "data")
    storage = work / "runs"
    result = {"machine": machine(), "epochs": args.epochs, "objects_per_batch": args.objects,
              "omp_num_threads": args.omp_threads}
    try:
        for label, workers in (("cold_1_worker", 1), ("warm_1_worker", 1), ("warm_2_workers", 2)):
            first_step, metrics = run(train_command(data, storage, label, args, workers), storage / label)
            speeds = [m["samples_per_s"] for m in metrics[1:]]
            result[label] = {
                "workers": workers, "seconds_to_first_step": first_step,
                "samples_per_s": sum(speeds) / len(speeds), "samples_per_s_per_epoch": [m["samples_per_s"] for m in metrics],
            }
            print(f"{label}: first step after {first_step:.1f} s, {result[label]['samples_per_s']:.3f} samples/s", flush=True)
    finally:
        recorded = clusters.recorded_local_cluster()
        if recorded is not None:
            clusters.stop_local_cluster(recorded)
    result["speedup_2_over_1"] = result["warm_2_workers"]["samples_per_s"] / result["warm_1_worker"]["samples_per_s"]
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
