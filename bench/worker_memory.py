"""Peak resident memory of each Ray Train worker in a training run, at the recipe's defaults.

Runs the real command line (``napari-raysam train``; by default 2 workers, random ``vit_t``,
decoder mode, so the fast recipe; ``--mode full`` trains micro-sam's recipe) on the embedded local
Ray, started for this benchmark in its own state folder and stopped at the end by the ids of its
own processes. While it runs, the resident set size of every process whose command line names
``RayTrainWorker`` (of this benchmark's cluster only: another Ray on the machine has its own
workers) is read every 0.2 s; the figure is each worker's peak. Datasets: six 256 x 256 synthetic
images (4 train, 2 val, 30 cells each; the set the "before" figure of issue 8 was taken on) and the
real HeLa frames (6 train, 2 val, 700 x 1100).

    .venv/bin/python bench/worker_memory.py [--epochs 3] [--datasets synthetic,hela]
        [--model vit_t] [--mode decoder] [--workers 2] [--objects N]

Full mode at micro-sam's defaults (25 objects, 8 rounds) outgrew a 24 GiB machine with one vit_t
worker (Ray's memory monitor killed it at 19.6 GB): give it ``--objects`` (vit_t: 5.5 GB with 1, 10.9 GB
with 5, docs/BENCHMARKS.md).
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

import psutil

from backend.dataset import write_samples
from common import hela_dataset, machine
from napari_raysam import cluster as clusters

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from synthetic import cell_samples  # noqa: E402


def ours(candidate: psutil.Process) -> bool:
    """Whether a process belongs to this benchmark's cluster (it inherited our state folder), not another Ray's."""
    try:
        return candidate.environ().get("NAPARI_RAYSAM_HOME") == os.environ["NAPARI_RAYSAM_HOME"]
    except (psutil.AccessDenied, psutil.NoSuchProcess):
        return False


def worker_peaks(command: list[str], log: Path) -> dict[int, float]:
    """Run ``command`` to its end, its output to ``log``; returns peak RSS (GB) per Ray Train worker
    process id of our cluster."""
    with open(log, "w") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
        peaks: dict[int, float] = {}
        while process.poll() is None:
            for candidate in psutil.process_iter(["pid", "cmdline", "memory_info"]):
                cmdline = " ".join(candidate.info["cmdline"] or [])
                if "RayTrainWorker" in cmdline and candidate.info["memory_info"] is not None and ours(candidate):
                    rss = candidate.info["memory_info"].rss / 1e9
                    peaks[candidate.info["pid"]] = max(peaks.get(candidate.info["pid"], 0.0), rss)
            time.sleep(0.2)
    if process.returncode != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-20:])
        raise RuntimeError(f"{' '.join(command)} failed with exit code {process.returncode}:\n{tail}")
    return peaks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--datasets", default="synthetic,hela")
    parser.add_argument("--model", default="vit_t", help="SAM type, random weights")
    parser.add_argument("--mode", default="decoder", choices=("decoder", "full"))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--objects", type=int, help="objects per image and step (default: the recipe's)")
    args = parser.parse_args()
    print(machine(), flush=True)
    work = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    os.environ["NAPARI_RAYSAM_HOME"] = str(work / "state")
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    data = {}
    if "synthetic" in args.datasets:
        data["synthetic"] = work / "synthetic.zarr"
        write_samples(data["synthetic"], cell_samples(4, "train", seed=1, shape=(256, 256), n_cells=30)
                      + cell_samples(2, "val", seed=2, shape=(256, 256), n_cells=30))
    if "hela" in args.datasets:
        data["hela"] = hela_dataset(work / "hela")
    result = {"machine": machine(), "model": args.model, "mode": args.mode, "workers": args.workers}
    try:
        for name, path in data.items():
            command = [
                str(Path(sys.executable).parent / "napari-raysam"), "train", "--data", str(path),
                "--storage", str(work / "runs"), "--model", f"random:{args.model}", "--mode", args.mode,
                "--epochs", str(args.epochs), "--workers", str(args.workers), "--run-name", f"memory-{name}",
                "--launcher", "ray-train",  # one worker too: the figure is a Ray Train worker's
            ] + (["--objects-per-batch", str(args.objects)] if args.objects else [])
            peaks = worker_peaks(command, work / f"{name}.log")
            result[name] = sorted(peaks.values(), reverse=True)
            peaks_gb = [round(p, 2) for p in result[name]]
            print(f"{name}, {args.model} {args.mode}: peak RSS per Ray Train worker (GB): {peaks_gb}", flush=True)
    finally:
        running = clusters.running_local_cluster()
        if running is not None:
            clusters.stop_local_cluster(running)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
