"""Held-out learning per minute: the fast decoder recipe vs micro-sam's recipe, same data, same model.

Both recipes train random ``vit_t`` in decoder mode (encoder frozen, embeddings computed once and
cached; computing them is not in the budget) on the CTC HeLa frames 0-10 (even), validate on 12
and 14, in this process (no Ray). Each mark (``--marks``, minutes) is its own run, as ``napari-raysam
train --minutes M`` trains: the budget is the run's wall-clock time of training (steps and each
epoch's validation), the learning rate anneals over it, and the run exports the epoch of the highest
val IoU. Run it with one torch thread on an otherwise idle machine and the minutes are CPU-minutes;
each run's process CPU time is printed beside it. The exported model is scored on the held-out
frames 17 and 19 with ``backend.evaluation`` (box IoU, single-point IoU; full resolution; the demo's
40 evenly spread objects per frame, 80 in all). Nothing is chosen on the held-out frames.

micro-sam's recipe is ``SamTrainer._interactive_train_iteration`` (our ``--recipe micro-sam``,
which matches ``train_sam`` step for step: tests/test_recipe.py) with precomputed embeddings,
which makes it faster than ``train_sam`` itself, whose frozen encoder still runs every step.
``micro-sam-full`` is the same recipe in full mode: the image encoder trains too, so every step
runs it and nothing is cached (decoder mode against full mode, in time to a held-out IoU).

    OMP_NUM_THREADS=1 .venv/bin/python bench/learning_curve.py [--marks 1,2,5,10] [--recipes fast,micro-sam,micro-sam-full]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from backend.config import TrainConfig
from backend.models import load_model
from backend.run_directory import kept_epoch
from backend.training import train
from common import hela_dataset, setting_value, start_bench
from napari_raysam.cli import EPOCH_CAP
from napari_raysam.demo import score
from napari_raysam.runs import MetricsReader, read_progress

# micro-sam's recipe as the demo ran it (25 objects x 8 rounds needs ~10 GB, see BENCHMARKS), and
# the random-start learning rate measured for it in the demo (1e-3 beats micro-sam's 1e-4 default).
MICRO_SAM = {"recipe": "micro-sam", "n_objects_per_batch": 4, "n_sub_iteration": 4, "lr": 1e-3}
# --recipes names: the decoder-mode runs, and micro-sam's recipe in full mode (the encoder trains too)
# for the time to a held-out IoU of decoder mode against full mode
MODES = {"fast": "decoder", "micro-sam": "decoder", "micro-sam-full": "full"}


def budgeted_run(config: TrainConfig, test: Path) -> dict:
    """Train ``config`` (its ``minutes``) and score the exported model on the "val" split of ``test``."""
    cpu_before = time.process_time()
    model = load_model(str(train(config)))
    cpu_s = time.process_time() - cpu_before
    metrics = MetricsReader(config.run_dir).read()
    progress = read_progress(config.run_dir)
    scores = score(model, test)  # the demo's 40 evenly spread objects per frame
    return {"box_iou": scores["box_iou"], "point_iou": scores["point_iou"], "epochs": len(metrics),
            "kept_epoch": kept_epoch(metrics)["epoch"], "trained_s": progress["elapsed_s"], "cpu_s_with_setup": cpu_s,
            "val_iou": [round(m["val_iou"], 4) for m in metrics]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--marks", default="1,2,5,10", help="training budgets in minutes, one run each")
    parser.add_argument("--recipes", default="fast,micro-sam", help=f"any of {', '.join(MODES)}")
    parser.add_argument("--set", action="append", default=[], help="fast recipe override, e.g. lr=3e-4")
    parser.add_argument("--dev", action="store_true", help="development: score the val frames, not the held-out ones")
    args = parser.parse_args()
    work = start_bench("bench-curve-")
    data = hela_dataset(work / "data")
    test = data if args.dev else data.parent / "hela_test.zarr"
    split = "val" if args.dev else "held-out"
    fast = {"recipe": "fast", **{k: setting_value(v) for k, v in (s.split("=", 1) for s in args.set)}}
    start = score(load_model("random:vit_t"), test)
    print(f"start: {split} box IoU {start['box_iou']:.4f}, point IoU {start['point_iou']:.4f}", flush=True)
    results = [{"recipe": "start", "box_iou": start["box_iou"], "point_iou": start["point_iou"]}]
    for mark in [float(m) for m in args.marks.split(",")]:
        for recipe in args.recipes.split(","):  # alternating: drift in the machine's speed hits both
            overrides = fast if recipe == "fast" else MICRO_SAM
            config = TrainConfig(
                data=str(data), storage=str(work / "runs"), model="random:vit_t", mode=MODES[recipe],
                minutes=mark, epochs=EPOCH_CAP, **overrides,
            )
            print(f"{recipe}, {mark:g} minutes: {overrides} | load {os.getloadavg()}", flush=True)
            result = budgeted_run(config, test)
            print(f"  {result['epochs']} epochs (kept {result['kept_epoch']}), CPU {result['cpu_s_with_setup']:.0f} s: "
                  f"{split} box IoU {result['box_iou']:.3f}, point IoU {result['point_iou']:.3f}", flush=True)
            results.append({"recipe": recipe, "minutes": mark, "overrides": overrides, **result,
                            "load_after": os.getloadavg()})
    print(json.dumps(results))


if __name__ == "__main__":
    main()
