"""Held-out learning per CPU-minute: the fast decoder recipe vs micro-sam's recipe, same run.

Both recipes train random ``vit_t`` in decoder mode (encoder frozen, embeddings computed once;
computing them is not in the budget) on the CTC HeLa frames 0-10 (even), validate on 12 and
14, in this process (no Ray). Budgets are *process CPU time of training* (the steps and each
epoch's validation; the held-out scoring below is not counted), so another job on the machine
slows the wall clock, not the figures. At each mark (``--marks`` CPU-minutes) the current
weights are kept; after training they are scored on the held-out frames 17 and 19 with
``backend.evaluation`` (box IoU, single-point IoU; full resolution; the demo's 40 evenly
spread objects per frame, 80 in all). Nothing is chosen on the
held-out frames. Recipes alternate run by run (fast, micro-sam, fast, ...) so drift in the
machine's speed hits both.

micro-sam's recipe is ``SamTrainer._interactive_train_iteration`` (our ``--recipe micro-sam``,
which matches ``train_sam`` step for step: tests/test_recipe.py) with precomputed embeddings,
which makes it faster than ``train_sam`` itself, whose frozen encoder still runs every step.

    .venv/bin/python bench/learning_curve.py [--marks 1,2,5,10] [--recipes fast,micro-sam] [--repeats 1]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


from backend.config import TrainConfig
from backend.dataset import open_dataset
from backend.evaluation import evaluate_images
from backend.models import load_model
from backend.training import SamFineTuner
from common import hela_dataset, start_bench
from napari_raysam.demo import scored_objects

# micro-sam's recipe as the demo ran it (25 objects x 8 rounds needs ~10 GB, see BENCHMARKS), and
# the random-start learning rate measured for it in the demo (1e-3 beats micro-sam's 1e-4 default).
MICRO_SAM = {"recipe": "micro-sam", "n_objects_per_batch": 4, "n_sub_iteration": 4, "lr": 1e-3}


class CpuClock:
    """Process CPU seconds, counted only between ``resume()`` and ``pause()``."""

    def __init__(self) -> None:
        self.total, self._since = 0.0, None

    def resume(self) -> None:
        self._since = time.process_time()

    def pause(self) -> None:
        self.total += time.process_time() - self._since
        self._since = None

    def now(self) -> float:
        return self.total + (time.process_time() - self._since if self._since is not None else 0.0)


def train_with_marks(config: TrainConfig, marks_s: list[float]) -> tuple[dict[float, dict], list[dict], float]:
    """Train until the last mark; returns (mark -> trainable weights, epoch records, embedding setup seconds)."""
    started = time.perf_counter()
    tuner = SamFineTuner(config)
    setup_s = time.perf_counter() - started
    clock = CpuClock()
    snapshots: dict[float, dict] = {}
    pending = list(marks_s)

    def after_step(epoch: int, step: int, total: int) -> None:
        while pending and clock.now() >= pending[0]:
            snapshots[pending.pop(0)] = tuner._trainable_state()

    tuner.progress = after_step
    tuner.out_of_time = lambda: not pending
    records = []
    epoch = 0
    clock.resume()
    while pending:
        record = tuner.run_epoch(epoch)
        records.append({**record.to_dict(), "cpu_s": clock.now()})
        print(f"  epoch {epoch}: cpu {clock.now():.0f} s, val loss {record.val_loss:.3f}, val IoU {record.val_iou:.3f}",
              flush=True)
        epoch += 1
    clock.pause()
    return snapshots, records, setup_s


def scores_at_marks(config: TrainConfig, snapshots: dict[float, dict], test: Path) -> dict[float, dict]:
    """Box and point IoU on the "val" split of ``test`` of the weights kept at each mark (and of the start)."""
    sam = load_model(config.model).sam
    dataset = open_dataset(test)
    ids = dataset.require_objects("val")
    # the demo's evenly spread 40 objects per frame: all 381 cost ~0.4 CPU-s per prompt and model
    images, labels = [dataset.sam_image(i) for i in ids], [scored_objects(dataset.labels(i)) for i in ids]
    scores = {0.0: evaluate_images(sam, images, labels, automatic=False)}
    for mark, state in snapshots.items():
        sam.load_state_dict(state, strict=False)
        scores[mark] = evaluate_images(sam, images, labels, automatic=False)
    return {mark: {"box_iou": s["box_iou"], "point_iou": s["point_iou"]} for mark, s in scores.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--marks", default="1,2,5,10", help="CPU-minutes at which to score")
    parser.add_argument("--recipes", default="fast,micro-sam")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--set", action="append", default=[], help="fast recipe override, e.g. lr=3e-4")
    parser.add_argument("--dev", action="store_true", help="development: score the val frames, not the held-out ones")
    args = parser.parse_args()
    work = start_bench("bench-curve-")
    data = hela_dataset(work / "data")
    test = data.parent / "hela_test.zarr"
    marks_s = [float(m) * 60 for m in args.marks.split(",")]
    fast = {"recipe": "fast", **{k: json.loads(v) for k, v in (s.split("=", 1) for s in args.set)}}
    results = []
    for repeat in range(args.repeats):
        for recipe in args.recipes.split(","):
            overrides = fast if recipe == "fast" else MICRO_SAM
            config = TrainConfig(
                data=str(data), storage=str(work / "runs"), model="random:vit_t", mode="decoder",
                epochs=10_000, lr_schedule="constant", seed=repeat, **overrides,
            )
            print(f"{recipe} (repeat {repeat}): {overrides} | load {os.getloadavg()}", flush=True)
            snapshots, records, setup_s = train_with_marks(config, marks_s)
            scores = scores_at_marks(config, snapshots, data if args.dev else test)
            for mark, score in scores.items():
                print(f"  {mark / 60:4.1f} CPU-min: {'val' if args.dev else 'held-out'} box IoU {score['box_iou']:.3f}, "
                      f"point IoU {score['point_iou']:.3f}", flush=True)
            results.append({"recipe": recipe, "repeat": repeat, "overrides": overrides, "setup_s": setup_s,
                            "held_out": scores, "epochs": records, "load_after": os.getloadavg()})
    print(json.dumps(results))


if __name__ == "__main__":
    main()
