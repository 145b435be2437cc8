"""``napari-raysam``: everything the widget does, for scripts and headless servers.

    napari-raysam export IMAGE... --labels LABEL... -o data.zarr
    napari-raysam train --data data.zarr --storage runs/ [--address http://head:8265]
    napari-raysam follow RUN_NAME --storage runs/ [--address ...]
    napari-raysam stop RUN_NAME [--address ...]
    napari-raysam evaluate --model runs/<run>/model --data data.zarr
    napari-raysam export-model runs/<run>/model -o model.pt
    napari-raysam cluster start|status|stop
    napari-raysam demo
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from backend.config import MODES, ConfigError, TrainConfig
from backend.dataset import DatasetError
from backend.models import ModelError
from napari_raysam import jobs
from napari_raysam.cluster import Cluster, ClusterError, default_cpus_per_worker

USER_ERRORS = (ConfigError, DatasetError, ModelError, ClusterError, jobs.JobFailed, PermissionError, FileNotFoundError)


def _int_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated channel numbers like 0,1,2, got '{text}'")


def _add_cluster_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--address", help="Ray dashboard address of the cluster (http://head:8265); default: the embedded local Ray"
    )
    parser.add_argument("--token", help="Ray auth token (default: $RAY_AUTH_TOKEN, ~/.ray/auth_token)")


def resolve_cluster(address: str | None, token: str | None, num_gpus: int | None = None) -> Cluster:
    """The cluster named by ``--address``, or the embedded local one (started on first use)."""
    from napari_raysam import cluster

    if address:
        return cluster.connect(address, token)
    return cluster.start_local_cluster(num_gpus=num_gpus)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="napari-raysam", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    export = commands.add_parser("export", help="add image/label files to a dataset (created if missing)")
    export.add_argument("images", nargs="+", type=Path, help="images: tif, png or npy; 2D, optionally multichannel")
    export.add_argument("--labels", nargs="+", type=Path, required=True, help="instance label files, one per image")
    export.add_argument("-o", "--output", type=Path, required=True, help="dataset folder (.zarr)")
    export.add_argument("--sam-channels", type=_int_list, help="channels that feed SAM's RGB input, e.g. 0,3,2")
    export.add_argument("--channel-names", help="comma-separated channel names, e.g. microtubules,protein,nucleus,er")
    export.add_argument("--split", choices=("train", "val"), help="put every image in this split")
    export.add_argument("--val-fraction", type=float, default=0.2, help="fraction of images for validation")

    train = commands.add_parser("train", help="fine-tune SAM on a dataset as a Ray job")
    train.add_argument("--data", type=Path, required=True, help="dataset folder (.zarr)")
    train.add_argument("--storage", required=True, help="folder for run directories (shared storage on a cluster)")
    _add_cluster_args(train)
    train.add_argument("--workers", type=int, default=1, help="Ray Train workers (data parallel)")
    train.add_argument("--gpu", action="store_true", help="one GPU per worker")
    train.add_argument(
        "--cpus-per-worker", type=int,
        help="CPU cores per worker, its PyTorch threads (default: this computer's cores / workers "
        "on the embedded cluster, 1 on a given cluster)",
    )
    train.add_argument("--mode", choices=MODES, default="decoder")
    train.add_argument("--epochs", type=int, default=10)
    train.add_argument("--model", default="vit_b_lm", help="zoo name, checkpoint path or random:<type>")
    train.add_argument("--lr", type=float, help="peak learning rate (default: 1e-4 decoder, 1e-5 full/lora)")
    train.add_argument("--batch-size", type=int, default=1)
    train.add_argument("--patch-size", type=int, default=512, help="crop size for full/lora modes")
    train.add_argument("--objects-per-batch", type=int, default=25)
    train.add_argument("--run-name", default="", help="unique name of this run (default: time-model-mode)")
    train.add_argument("--no-ray", action="store_true", help="train in this process without Ray")
    train.add_argument("--detach", action="store_true", help="submit and return; follow later with `follow`")

    follow = commands.add_parser("follow", help="show a running job's progress until it ends")
    follow.add_argument("run_name")
    follow.add_argument("--storage", required=True)
    _add_cluster_args(follow)

    stop = commands.add_parser("stop", help="stop a training job")
    stop.add_argument("run_name")
    _add_cluster_args(stop)

    evaluate = commands.add_parser("evaluate", help="score a model on a dataset split (JSON)")
    evaluate.add_argument("--model", required=True, help="zoo name, checkpoint path, model folder or random:<type>")
    evaluate.add_argument("--data", type=Path, required=True)
    evaluate.add_argument("--split", default="val", choices=("train", "val"))
    evaluate.add_argument("--no-automatic", action="store_true", help="skip automatic segmentation (mSA, SA50)")
    evaluate.add_argument("--device", default="cpu")

    export_model = commands.add_parser("export-model", help="write a model folder as micro-sam's .pt")
    export_model.add_argument("model_folder", type=Path)
    export_model.add_argument("-o", "--output", type=Path, required=True)

    cluster = commands.add_parser("cluster", help="the embedded local Ray cluster")
    cluster.add_argument("action", choices=("start", "status", "stop"))

    demo = commands.add_parser("demo", help="the whole loop on real HeLa frames, headless, on the local Ray")
    demo.add_argument("-o", "--output", type=Path, default=Path("demo_output"))
    demo.add_argument("--model", help="starting model (default: the best one available)")
    demo.add_argument("--mode", choices=MODES, default="decoder")
    demo.add_argument("--epochs", type=int, default=4)
    demo.add_argument("--workers", type=int, default=1)
    _add_cluster_args(demo)
    return parser


def _update_printer():
    """Job log to stderr, one line per finished epoch to stdout."""
    return jobs.report_epochs(lambda line: print(line, flush=True), job_log=sys.stderr.write)


def _train(args: argparse.Namespace) -> int:
    config = TrainConfig(
        data=str(args.data.resolve()),
        storage=str(Path(args.storage).resolve()),
        model=args.model,
        mode=args.mode,
        run_name=args.run_name,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        patch_shape=(args.patch_size, args.patch_size),
        n_objects_per_batch=args.objects_per_batch,
        workers=args.workers,
        cpus_per_worker=args.cpus_per_worker or default_cpus_per_worker(args.workers, local=not args.address),
        use_gpu=args.gpu,
    )
    from backend.dataset import open_dataset

    open_dataset(config.data).require_objects("train")  # fail here, not minutes later in the job
    if args.no_ray:
        from backend.training import train

        model = train(config, on_epoch=lambda record: print(json.dumps(record.to_dict()), flush=True))
        print(f"model: {model}")
        return 0
    cluster = resolve_cluster(args.address, args.token, num_gpus=None)
    job_id = jobs.submit_training(cluster, config)
    print(f"submitted job {job_id}; run directory {config.run_dir}", flush=True)
    if args.detach:
        return 0
    model = jobs.follow(cluster, job_id, config.run_dir, on_update=_update_printer())
    print(f"model: {model}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted (a submitted job keeps running; stop it with `napari-raysam stop`)", file=sys.stderr)
        return 130


def _run(args: argparse.Namespace) -> int:
    if args.command == "export":
        from napari_raysam.export import export_files

        names = args.channel_names.split(",") if args.channel_names else None
        ids = export_files(
            args.images, args.labels, args.output, sam_channels=args.sam_channels, channel_names=names,
            split=args.split, val_fraction=args.val_fraction,
        )
        print(f"added {len(ids)} images to {args.output}")
        return 0
    if args.command == "train":
        return _train(args)
    if args.command == "follow":
        cluster = resolve_cluster(args.address, args.token)
        model = jobs.follow(cluster, args.run_name, Path(args.storage).resolve() / args.run_name, _update_printer())
        print(f"model: {model}")
        return 0
    if args.command == "stop":
        stopped = jobs.stop(resolve_cluster(args.address, args.token), args.run_name)
        print("stopped" if stopped else "the job was not running")
        return 0
    if args.command == "evaluate":
        from backend.evaluation import evaluate

        result = evaluate(args.model, args.data, args.split, automatic=not args.no_automatic, device=args.device)
        print(json.dumps(result.to_dict(), indent=2))
        return 0
    if args.command == "export-model":
        from backend.models import export_micro_sam_checkpoint

        print(f"wrote {export_micro_sam_checkpoint(args.model_folder, args.output)}")
        return 0
    if args.command == "cluster":
        return _cluster(args.action)
    if args.command == "demo":
        from napari_raysam.demo import run_demo

        run_demo(
            args.output, model=args.model, mode=args.mode, epochs=args.epochs, workers=args.workers,
            cluster=resolve_cluster(args.address, args.token),
        )
        return 0
    raise AssertionError(args.command)


def _cluster(action: str) -> int:
    from napari_raysam import cluster

    running = cluster.running_local_cluster()
    if action == "start":
        running = running or cluster.start_local_cluster()
        print(f"local Ray cluster at {running.dashboard_url}")
    elif action == "status":
        print(f"local Ray cluster at {running.dashboard_url}" if running else "no local Ray cluster running")
    elif running:
        print(f"stopped {cluster.stop_local_cluster(running)} processes")
    else:
        print("no local Ray cluster running")
    return 0


if __name__ == "__main__":
    sys.exit(main())
