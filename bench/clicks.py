"""The human-in-the-loop gain (issue 8): clicks per held-out object before and after one round of fine-tuning.

Start model ``random:vit_t``; the demo's CTC HeLa datasets (``common.hela_dataset``, as
bench/learning_curve.py): train on frames 0-10 (even), validate on 12 and 14, report on the
held-out frames 17 and 19, which choose nothing. Clicks come from ``backend.simulated_annotator``:
the box first, then one corrective click in the largest error region, until IoU >= 0.9 or 8
clicks (the box counts as click 1), on ``--objects`` evenly spread objects per held-out frame
(``napari_raysam.demo.scored_objects``, as the demo and evaluation's figures pick them).

Per seed: one ``--minutes`` round of decoder-mode fine-tuning with the default (fast) recipe, as
``napari-raysam train --minutes M`` runs it (``backend.training.train`` in this process, no Ray;
the epoch of highest val IoU is exported), then the clicks of the exported model. The start
model's clicks are measured once: ``random:vit_t``'s weights (seed 0) and the annotator are
deterministic, so every seed starts from the same figure. The embeddings of the training
frames are cached in the run storage, so only the first seed computes them.

Beside the clicks to IoU 0.9 (the figure), from the same annotations: the clicks to IoU 0.5 and the
mean IoU after the box alone and after all clicks, which say whether corrective clicks help a model
that does not reach 0.9. ``--rounds`` sets the recipe's prompting rounds (``n_sub_iteration``:
rounds after the first train corrective clicks). ``--frames val`` counts the clicks on the val
frames 12 and 14 instead, to choose settings without reading the held-out ones. The clicks are
sent as the annotator's Segment sends them; ``--mask-feedback`` also feeds each prediction's
logits back as the next one's mask prompt (micro-sam's evaluation with ``use_masks=True``).

    .venv/bin/python bench/clicks.py [--minutes 5] [--seeds 3] [--objects 60] [--rounds 1] [--mask-feedback]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
from segment_anything import SamPredictor

from backend.config import TrainConfig
from backend.dataset import open_dataset
from backend.models import load_model
from backend.simulated_annotator import click_summary, simulate_annotator
from backend.training import train
from common import hela_dataset, start_bench
from napari_raysam.cli import EPOCH_CAP
from napari_raysam.demo import scored_objects

START_MODEL = "random:vit_t"


def clicks_on(model: str, frames: Path, objects: int, mask_feedback: bool = False) -> dict:
    """The simulated annotator's summary (``click_summary``) of ``model`` on the val split of ``frames``, plus its seconds."""
    started = time.perf_counter()
    dataset = open_dataset(frames)
    ids = dataset.require_objects("val")
    labels = [scored_objects(dataset.labels(i), objects) for i in ids]

    def progress(done: int, total: int) -> None:
        if done % 10 == 0 or done == total:
            print(f"    {done}/{total} objects, {time.perf_counter() - started:.0f} s", flush=True)

    results = simulate_annotator(
        SamPredictor(load_model(model).sam), [dataset.sam_image(i) for i in ids], labels,
        mask_feedback=mask_feedback, progress=progress,
    )
    return {
        **click_summary(results), "clicks_to_0.5": float(np.mean([r.clicks_to(0.5) for r in results])),
        "box_iou": float(np.mean([r.ious[0] for r in results])), "clicks": [r.clicks for r in results],
        "seconds": time.perf_counter() - started,
    }


def described(summary: dict) -> str:
    return (f"{summary['mean_clicks']:.2f} clicks per object ({summary['reached']:.0%} reached IoU 0.9), "
            f"{summary['clicks_to_0.5']:.2f} to IoU 0.5; mean IoU {summary['box_iou']:.3f} after the box, "
            f"{summary['mean_iou']:.3f} after the last click")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=5.0, help="training time budget per seed")
    parser.add_argument("--seeds", type=int, default=3, help="training seeds 0, 1, ...")
    # 60 of each frame's ~190 objects: 3 seeds of 5 minutes take about 30 minutes on the 2 shared cores
    parser.add_argument("--objects", type=int, default=60, help="evenly spread held-out objects per frame")
    parser.add_argument("--rounds", type=int, default=None, help="prompting rounds per step (default: the recipe's)")
    parser.add_argument("--frames", choices=("held-out", "val"), default="held-out", help="where the clicks are counted")
    parser.add_argument("--mask-feedback", action="store_true", help="feed each prediction's logits back as a mask prompt")
    args = parser.parse_args()
    started = time.perf_counter()
    work = start_bench("bench-clicks-")
    data = hela_dataset(work / "data")
    frames = data.parent / "hela_test.zarr" if args.frames == "held-out" else data  # the val split of either

    print(f"start model {START_MODEL} | load {os.getloadavg()}", flush=True)
    before = clicks_on(START_MODEL, frames, args.objects, args.mask_feedback)
    print(f"  before: {described(before)} ({before['n_objects']} objects, {before['seconds']:.0f} s)", flush=True)
    rows = []
    for seed in range(args.seeds):
        config = TrainConfig(
            data=str(data), storage=str(work / "runs"), model=START_MODEL, mode="decoder",
            minutes=args.minutes, epochs=EPOCH_CAP, seed=seed, run_name=f"seed-{seed}",
            **({} if args.rounds is None else {"n_sub_iteration": args.rounds}),
        )
        print(f"seed {seed}: {args.minutes} minutes of {config.recipe} recipe, {config.n_sub_iteration} rounds "
              f"| load {os.getloadavg()}", flush=True)
        epochs = []
        model = train(config, on_epoch=epochs.append)
        print(f"  {len(epochs)} epochs, val IoU {epochs[0].val_iou:.3f} -> {epochs[-1].val_iou:.3f}", flush=True)
        after = clicks_on(str(model), frames, args.objects, args.mask_feedback)
        print(f"  after: {described(after)} ({after['seconds']:.0f} s) | load {os.getloadavg()}", flush=True)
        rows.append({"seed": seed, "epochs": len(epochs), "val_iou": [e.val_iou for e in epochs], "after": after})

    gains = [before["mean_clicks"] - row["after"]["mean_clicks"] for row in rows]
    print(f"mean clicks before {before['mean_clicks']:.2f}, after "
          f"{sum(r['after']['mean_clicks'] for r in rows) / len(rows):.2f} (fewer by {', '.join(f'{g:.2f}' for g in gains)}"
          f" per seed) | {time.perf_counter() - started:.0f} s in all | load {os.getloadavg()}", flush=True)
    print(json.dumps({"args": vars(args), "before": before, "seeds": rows}))


if __name__ == "__main__":
    main()
