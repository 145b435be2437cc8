"""Where a run's start-up goes on a fresh embedded cluster: Ray's processes, then the worker's files.

A 1-worker decoder-mode run of random vit_t on the demo's HeLa training frames (frames 0-10 even,
val 12, 14), submitted through the run client with a 6-second budget. Run it twice with the same
folder: the first computes the embeddings into the storage's cache, the second measures start-up
alone. Prints, in seconds from the submission: when each of Ray's processes started (its session log
file) with the actor it runs, when the job was running, and when the baseline, the first step's
progress and the model folder appeared.

    .venv/bin/python bench/ray_startup.py /tmp/ray-startup   # twice
    .venv/bin/python bench/ray_startup.py /tmp/ray-startup --launcher ray-train   # through Ray Train's workers

With ``--storage URI`` the run's storage is an object store (the dataset is uploaded there first,
and counted in the time to the submission's return). For an S3-compatible server on this machine:

    .venv/bin/moto_server -H 127.0.0.1 -p 9000 &
    export AWS_ENDPOINT_URL=http://127.0.0.1:9000 AWS_ACCESS_KEY_ID=x AWS_SECRET_ACCESS_KEY=x AWS_DEFAULT_REGION=us-east-1
    .venv/bin/python bench/ray_startup.py /tmp/ray-startup --storage s3://bench/runs   # twice; makes the bucket
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # every Ray port on 127.0.0.1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", nargs="?", default="/tmp/ray-startup", type=Path)
    parser.add_argument("--storage", help="the runs' storage (default: FOLDER/runs); an s3:// URI for object storage")
    parser.add_argument("--launcher", default="auto", help="auto (the job's driver trains), ray-train or driver")
    args = parser.parse_args()
    folder = args.folder.resolve()
    os.environ["NAPARI_RAYSAM_HOME"] = str(folder / "home")
    os.environ.setdefault("NAPARI_RAYSAM_CACHE", str(folder / "cache"))
    from backend.config import TrainConfig
    from napari_raysam.cluster import start_local_cluster, stop_local_cluster
    from napari_raysam.demo import build_datasets
    from napari_raysam.runs.client import RunClient

    train, _ = build_datasets(folder)
    storage = args.storage or str(folder / "runs")
    if storage.startswith("s3://"):
        from backend.storage import location

        bucket = location(storage)
        if not bucket.fs.exists(bucket.path.split("/")[0]):
            bucket.fs.mkdir(bucket.path.split("/")[0])  # the benchmark's own bucket
    cluster = start_local_cluster()
    try:
        config = TrainConfig(data=str(train), storage=storage, model="random:vit_t", mode="decoder",
                             minutes=0.1, epochs=1000, workers=1, cpus_per_worker=2,
                             run_name=f"startup-{int(time.time())}", launcher=args.launcher)
        client = RunClient(cluster)
        start = time.time()
        client.submit(config)
        seen: dict[str, float] = {"submitted": round(time.time() - start, 1)}
        files = {"baseline": "baseline.json", "first progress": "progress.json", "model folder": "model/meta.json"}
        while "model folder" not in seen and time.time() - start < 300:
            now = round(time.time() - start, 1)
            seen.update({what: now for what, name in files.items() if what not in seen and (config.run_dir / name).exists()})
            if "running" not in seen and client.info(config.run_name).state.value == "running":
                seen["running"] = now
            time.sleep(0.05)
        print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; storage {storage}")
        logs = Path(cluster.temp_dir, "session_latest", "logs")
        for log in sorted(logs.glob("worker-*.out"), key=os.path.getctime):
            if os.path.getctime(log) > start:
                actors = [line.split(":actor_name:", 1)[1] for line in log.read_text(errors="replace").splitlines()
                          if ":actor_name:" in line]
                print(f"  {os.path.getctime(log) - start:5.1f} s  process of {actors[0] if actors else '(no actor)'}")
        print("  " + json.dumps(seen))
    finally:
        stop_local_cluster(cluster)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
