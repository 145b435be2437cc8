"""Job entry point: ``python -m backend train --config CONFIG [--no-ray]``.

CONFIG is a TrainConfig as a JSON file path or as the JSON object itself (what the job
client submits, so the cluster needs no file from the submitting machine).

Ray Jobs runs this as the job's driver, which starts Ray Train's workers, or, with the config's
``launcher`` set to ``driver``, trains in this process itself. ``--no-ray`` runs that same
in-process training outside any Ray job (e.g. on a GPU machine that has no Ray installed).
"""

from __future__ import annotations

import argparse
import json
import sys

from backend.config import ConfigError, TrainConfig
from backend.cpu_priority import RAY_WORKER_NICENESS, lower_cpu_priority, use_reserved_cpus
from backend.failures import said_errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m backend")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="fine-tune SAM as described by a config.json")
    train.add_argument("--config", required=True, help="TrainConfig JSON: a file path or the JSON object")
    train.add_argument("--no-ray", action="store_true", help="train in this process, without Ray")
    args = parser.parse_args(argv)
    try:
        if args.config.lstrip().startswith("{"):
            config = TrainConfig.from_dict(json.loads(args.config))
        else:
            config = TrainConfig.from_json(args.config)
    except (ConfigError, OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        if args.no_ray or config.launcher == "driver":
            if not args.no_ray:  # the job's driver trains, as a Ray Train worker would: at its niceness, so
                # napari beside the run keeps the cores first, on the CPUs the job reserved (entrypoint_num_cpus)
                lower_cpu_priority(RAY_WORKER_NICENESS)
                use_reserved_cpus(config.cpus_per_worker)
            from backend.training import train as train_locally

            model = train_locally(config)
        else:
            import ray

            from backend.ray_train import run

            ray.init()  # inside a Ray job this connects to the job's cluster
            model = run(config)
    except said_errors() as error:  # one line, which the run client shows as the reason the run failed
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 1
    print(f"model written to {model}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
