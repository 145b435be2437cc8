"""Choosing the fast recipe's settings on the validation frames, never the held-out ones.

Each setting trains random ``vit_t`` in decoder mode for ``--minutes`` of wall time (``napari-raysam
train --minutes``, in this process, no Ray) on the CTC HeLa frames 0-10 (even), keeping the epoch
of the highest windowed val IoU as a run does; the kept model is then scored on the val frames 12
and 14 with the whole-image decoder (``backend.evaluation``: box IoU and single-point IoU of the
demo's 40 evenly spread objects per frame), which is what the annotator runs. The held-out frames
17 and 19 are not read. A setting is ``key=value`` pairs joined by ``,``: ``TrainConfig`` fields,
or ``FAR_ROWS`` / ``MIN_CROP`` of ``backend.windowed_decoder``. One line of JSON per setting.
``--model`` starts every setting from other weights, e.g. a model folder an earlier run exported (a
continued round, as the fine-tune dock's second round trip is); its own val scores are printed first.
``--clicks N`` also runs the simulated annotator (bench/clicks.py's) on N evenly spread objects per
val frame: whether corrective clicks help the kept model.

    OMP_NUM_THREADS=2 .venv/bin/python bench/recipe_settings.py --minutes 2.5 lr=3e-4,n_objects_per_batch=32 lr=1e-3,lr_schedule=constant
"""

from __future__ import annotations

import argparse
import json
import time

from backend import windowed_decoder
from backend.config import TrainConfig
from backend.models import load_model
from backend.run_directory import kept_epoch
from backend.training import train
from clicks import clicks_on
from common import hela_dataset, setting_value, start_bench
from napari_raysam.demo import score
from napari_raysam.runs import MetricsReader

RECIPE_CONSTANTS = ("FAR_ROWS", "MIN_CROP")
RANDOM_START = "random:vit_t"


def parse_setting(text: str) -> tuple[dict, dict]:
    """``"lr=3e-4,FAR_ROWS=4"`` -> (TrainConfig fields, windowed_decoder constants)."""
    fields, constants = {}, {}
    for pair in filter(None, text.split(",")):
        key, value = pair.split("=", 1)
        if key in RECIPE_CONSTANTS:
            constants[key] = int(value)
        else:
            fields[key] = setting_value(value)
    return fields, constants


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("settings", nargs="*", default=[""], help="key=value,... (empty: the defaults)")
    parser.add_argument("--minutes", type=float, default=2.5)
    parser.add_argument("--clicks", type=int, default=0, help="simulated annotator on N objects per val frame")
    parser.add_argument("--model", default=RANDOM_START, help=f"starting weights (default: {RANDOM_START})")
    args = parser.parse_args()
    work = start_bench("recipe_settings_")
    data = hela_dataset(work)
    if args.model != RANDOM_START:
        scores = score(load_model(args.model), data)
        print(json.dumps({"start_model": args.model, "val_box_iou": round(scores["box_iou"], 4),
                          "val_point_iou": round(scores["point_iou"], 4)}), flush=True)
    defaults = {name: getattr(windowed_decoder, name) for name in RECIPE_CONSTANTS}
    for setting in args.settings:
        fields, constants = parse_setting(setting)
        for name, value in {**defaults, **constants}.items():
            setattr(windowed_decoder, name, value)
        config = TrainConfig(data=str(data), storage=str(work / "runs"), model=args.model,
                             minutes=args.minutes, epochs=100_000, **fields)
        start = time.perf_counter()
        folder = train(config)
        model = load_model(str(folder))
        metrics = MetricsReader(config.run_dir).read()
        kept = kept_epoch(metrics)
        scores = score(model, data)  # the val split of the training dataset: frames 12 and 14
        clicks = {}
        if args.clicks:
            summary = clicks_on(str(folder), data, args.clicks)
            clicks = {
                "clicks_iou_after_box_and_last": [round(summary["box_iou"], 4), round(summary["mean_iou"], 4)],
                "clicks_to_0.5": round(summary["clicks_to_0.5"], 2), "clicks_to_0.9": round(summary["mean_clicks"], 2),
            }
        print(json.dumps({
            "setting": setting or "defaults", "epochs": len(metrics), "kept_epoch": kept["epoch"],
            "windowed_val_iou_first_kept_last": [round(metrics[0]["val_iou"], 4), round(kept["val_iou"], 4),
                                                 round(metrics[-1]["val_iou"], 4)],
            "val_box_iou": round(scores["box_iou"], 4), "val_point_iou": round(scores["point_iou"], 4),
            **clicks, "wall_s": round(time.perf_counter() - start),
        }), flush=True)


if __name__ == "__main__":
    main()
