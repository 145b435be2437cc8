"""``napari-raysam``: everything the widget does, for scripts and headless servers.

    napari-raysam export IMAGE... --labels LABEL... -o data.zarr
    napari-raysam train --data data.zarr --storage runs/ [--address http://head:8265]
    napari-raysam runs list | follow RUN | stop RUN | resume RUN | fetch RUN -o DIR [--storage S]   [--address ...]
    napari-raysam evaluate --model runs/<run>/model --data data.zarr
    napari-raysam export-model runs/<run>/model -o model.pt
    napari-raysam cluster start|status|stop
    napari-raysam demo
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from backend.config import LAUNCHERS, MODES, RECIPES, ConfigError, TrainConfig
from backend.dataset import DatasetError
from backend.models import ModelError
from backend.storage import StorageError, is_uri, location
from napari_raysam.cluster import Cluster, ClusterError, default_cpus_per_worker
from napari_raysam.runs import RunClient, RunError, RunUpdate, fetch_model

USER_ERRORS = (
    ConfigError, DatasetError, ModelError, ClusterError, RunError, StorageError, PermissionError, FileNotFoundError,
)
EPOCH_CAP = 1000
"""--epochs when only --minutes is given: time, not epochs, ends the run."""


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

    upload = commands.add_parser(
        "upload", help="copy a dataset into a storage (once, by content) and print its URI there, for --data"
    )
    upload.add_argument("data", type=Path, help="dataset folder (.zarr)")
    upload.add_argument("--storage", required=True, help="folder or object-store URI (s3://bucket/runs)")

    train = commands.add_parser("train", help="fine-tune SAM on a dataset as a Ray job")
    train.add_argument("--data", required=True, help="dataset folder (.zarr), or one uploaded to an object store")
    train.add_argument(
        "--storage", required=True,
        help="folder or object-store URI for run directories (s3://bucket/runs; on a cluster: storage every node "
        "reaches); a local --data is uploaded there when the cluster could not read it",
    )
    _add_cluster_args(train)
    train.add_argument("--workers", type=int, default=1, help="Ray Train workers (data parallel)")
    train.add_argument("--gpu", action="store_true", help="one GPU per worker")
    train.add_argument(
        "--cpus-per-worker", type=int,
        help="CPU cores per worker, its PyTorch threads (default: this computer's cores / workers "
        "on the embedded cluster, 1 on a given cluster)",
    )
    train.add_argument(
        "--launcher", choices=LAUNCHERS, default="auto",
        help="who trains in the job: ray-train workers, or the job's driver itself (one worker, starts seconds "
        "sooner; a failure ends the run, `runs resume` continues it); auto: driver for one worker on the embedded "
        "cluster, else ray-train",
    )
    train.add_argument("--mode", choices=MODES, default="decoder")
    train.add_argument(
        "--recipe", choices=RECIPES,
        help="fast: many objects per batched decoder pass (decoder mode's default); micro-sam: micro-sam's "
        "iterative prompting (full/lora default)",
    )
    train.add_argument(
        "--minutes", type=float, help="time budget: train this long, then export the best model (--epochs caps it)"
    )
    train.add_argument("--epochs", type=int, help="epochs to train (default 10; with --minutes a cap of 1000)")
    train.add_argument("--model", default="vit_b_lm", help="zoo name, checkpoint path or random:<type>")
    train.add_argument(
        "--lr", type=float, help="peak learning rate (default: 1e-3 fast recipe; micro-sam's 1e-4 decoder, 1e-5 full/lora)"
    )
    train.add_argument("--batch-size", type=int, default=1)
    train.add_argument("--patch-size", type=int, default=512, help="crop size for full/lora modes")
    train.add_argument(
        "--objects-per-batch", type=int, help="objects per image and step (default: the recipe's, fast 32, micro-sam 25)"
    )
    train.add_argument(
        "--rounds", type=int, help="prompting rounds per object and step: the first prompt, then corrective clicks "
        "(default: the recipe's, fast 1, micro-sam 8; with the fast recipe's 1, the model's corrective clicks make "
        "a mask worse, and 2 stops that at the cost of a box that learns slower: docs/BENCHMARKS.md)"
    )
    train.add_argument("--run-name", default="", help="unique name of this run (default: time-model-mode)")
    train.add_argument("--no-ray", action="store_true", help="train in this process without Ray")
    train.add_argument("--detach", action="store_true", help="submit and return; follow later with `runs follow`")
    train.add_argument(
        "--resume", action="store_true", help="continue the run named by --run-name from its last epoch "
        "(without it, a run name that is taken is refused)",
    )

    runs = commands.add_parser("runs", help="training runs on the cluster: list, follow, stop, resume, fetch")
    run_commands = runs.add_subparsers(dest="runs_command", required=True)
    _add_cluster_args(run_commands.add_parser("list", help="this project's runs on the cluster, newest first"))
    for verb, text in (("follow", "show a run's progress until it ends"), ("stop", "stop a run")):
        command = run_commands.add_parser(verb, help=text)
        command.add_argument("run_name")
        _add_cluster_args(command)
    resume = run_commands.add_parser(
        "resume", help="continue an ended run from its latest epoch checkpoint (e.g. after its driver was killed)"
    )
    resume.add_argument("run_name")
    resume.add_argument("--epochs", type=int, help="train to this many epochs in all (default: the run's own)")
    resume.add_argument("--detach", action="store_true", help="submit and return; follow later with `runs follow`")
    _add_cluster_args(resume)
    fetch = run_commands.add_parser("fetch", help="copy a finished run's model folder")
    fetch.add_argument("run_name")
    fetch.add_argument("-o", "--output", type=Path, required=True, help="folder to write the model folder to")
    fetch.add_argument(
        "--storage", help="read the run from <storage>/RUN directly (a folder or s3:// URI), without asking the cluster"
    )
    _add_cluster_args(fetch)

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
    demo.add_argument("--minutes", type=float, help="training time budget (default: the demo's 3.5 minutes)")
    demo.add_argument("--workers", type=int, default=1)
    _add_cluster_args(demo)
    return parser


def epoch_line(line: dict) -> str:
    """One finished epoch of ``metrics.jsonl``, as the CLI and the demo print it."""
    return (
        f"epoch {line['epoch'] + 1}: train_loss {line['train_loss']:.4f}  val_loss {line['val_loss']:.4f}"
        f"  val_iou {line['val_iou']:.3f}  {line['samples_per_s']:.2f} samples/s"
    )


def print_update(log=print, job_log=None):
    """An ``on_update`` for ``RunClient.wait``: a line per finished epoch (and the job's own log to
    ``job_log``, e.g. ``sys.stderr.write``)."""
    printed = 0

    def on_update(update: RunUpdate) -> None:
        nonlocal printed
        if job_log is not None and update.new_log:
            job_log(update.new_log)
        if update.message and not update.state.ended:
            log(update.message)
        for line in update.metrics[printed:]:
            log(epoch_line(line))
        printed = len(update.metrics)

    return on_update


def _train(args: argparse.Namespace) -> int:
    config = TrainConfig(
        data=str(location(args.data)),
        storage=str(location(args.storage)),
        model=args.model,
        mode=args.mode,
        recipe=args.recipe,
        minutes=args.minutes,
        run_name=args.run_name,
        epochs=args.epochs or (EPOCH_CAP if args.minutes else 10),
        lr=args.lr,
        batch_size=args.batch_size,
        patch_shape=(args.patch_size, args.patch_size),
        n_objects_per_batch=args.objects_per_batch,
        n_sub_iteration=args.rounds,
        workers=args.workers,
        cpus_per_worker=args.cpus_per_worker or default_cpus_per_worker(args.workers, local=not args.address),
        use_gpu=args.gpu,
        launcher=args.launcher,
    )
    from backend.dataset import open_dataset

    images = None
    if not is_uri(config.data):
        dataset = open_dataset(config.data)
        dataset.require_objects("train")  # fail here, not minutes later in the job
        images = len(dataset.sample_ids())
    if args.no_ray:
        from backend.training import train

        if (config.run_dir / "config.json").exists() and not args.resume:
            raise RunError(
                f"{config.run_dir} already holds a run: choose another --run-name, or add --resume to continue it"
            )
        model = train(config, on_epoch=lambda record: print(json.dumps(record.to_dict()), flush=True))
        print(f"model: {model}")
        return 0
    client = RunClient(resolve_cluster(args.address, args.token, num_gpus=None))
    run = client.submit(config, images=images, resume=args.resume)
    print(f"submitted run {run.name}; run directory {run.run_dir}", flush=True)
    if args.detach:
        return 0
    model = client.wait(run.name, on_update=print_update(job_log=sys.stderr.write))
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
        print("interrupted (a submitted run keeps going; stop it with `napari-raysam runs stop RUN`)", file=sys.stderr)
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
    if args.command == "upload":
        from backend.dataset import open_dataset
        from backend.storage import upload_dataset

        print(upload_dataset(args.data, open_dataset(args.data).fingerprint(), str(location(args.storage))))
        return 0
    if args.command == "train":
        return _train(args)
    if args.command == "runs":
        return _runs(args)
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
            args.output, model=args.model, mode=args.mode, minutes=args.minutes, workers=args.workers,
            cluster=resolve_cluster(args.address, args.token),
        )
        return 0
    raise AssertionError(args.command)


def _runs(args: argparse.Namespace) -> int:
    if args.runs_command == "fetch" and args.storage:  # the storage alone: the cluster may be gone
        print(f"wrote {fetch_model(location(args.storage) / args.run_name, args.output)}")
        return 0
    client = RunClient(resolve_cluster(args.address, args.token))
    if args.runs_command == "list":
        runs = client.runs()
        if not runs:
            print(f"no napari-raysam runs on {client.cluster.dashboard_url}")
        for run in runs:
            started = time.strftime("%Y-%m-%d %H:%M", time.localtime(run.start_time)) if run.start_time else "-"
            images = f"{run.images} images" if run.images is not None else ""
            print(f"{run.name}\t{run.state.value}\t{started}\t{run.mode}\t{run.base_model}\t{images}\t{run.run_dir}")
    elif args.runs_command == "follow":
        print(f"model: {client.wait(args.run_name, on_update=print_update(job_log=sys.stderr.write))}")
    elif args.runs_command == "resume":
        run = client.resume(args.run_name, epochs=args.epochs)
        print(f"resumed run {run.name} as job {run.job_id}", flush=True)
        if not args.detach:
            print(f"model: {client.wait(run.name, on_update=print_update(job_log=sys.stderr.write))}")
    elif args.runs_command == "stop":
        print("stopped" if client.stop(args.run_name) else f"run {args.run_name} had already ended")
    else:
        print(f"wrote {fetch_model(client.info(args.run_name).run_dir, args.output)}")
    return 0


def _cluster(action: str) -> int:
    from napari_raysam import cluster

    if action == "start":
        print(f"local Ray cluster at {cluster.start_local_cluster().dashboard_url}")
    elif action == "status":
        running = cluster.running_local_cluster()
        print(f"local Ray cluster at {running.dashboard_url}" if running else "no local Ray cluster running")
    else:  # stop: also what is left of one that no longer answers (its dashboard died, say)
        recorded = cluster.recorded_local_cluster()
        stopped = cluster.stop_local_cluster(recorded) if recorded is not None else 0
        print(f"stopped {stopped} processes" if stopped else "no local Ray cluster running")
    return 0


if __name__ == "__main__":
    sys.exit(main())
