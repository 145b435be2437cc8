"""Training throughput of ``decoder`` mode vs ``full`` mode, for vit_t and vit_b.

Same real HeLa data, same prompting settings, 1 worker without Ray, fp32 on CPU (bf16
autocast on a GPU). Decoder mode embeds every image once before training (part of
the reported set-up time); its samples/s is training steps only, like full mode's. Random weights: throughput does not depend on them.

    .venv/bin/python bench/decoder_vs_full.py [--models vit_t,vit_b] [--full-steps 3] [--decoder-steps 12]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from backend.config import TrainConfig
from common import hela_dataset, machine, training_samples_per_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="vit_t,vit_b")
    parser.add_argument("--full-steps", type=int, default=3)
    parser.add_argument("--decoder-steps", type=int, default=12)
    parser.add_argument("--objects", type=int, default=10)
    parser.add_argument("--gpu", action="store_true")
    args = parser.parse_args()
    print(machine())
    work = Path(tempfile.mkdtemp(prefix="bench-modes-"))
    data = hela_dataset(work / "data")
    results = []
    for model_type in args.models.split(","):
        row = {"model": model_type}
        for mode, steps in (("decoder", args.decoder_steps), ("full", args.full_steps)):
            config = TrainConfig(
                data=str(data), storage=str(work / "runs"), model=f"random:{model_type}", mode=mode, epochs=1,
                n_objects_per_batch=args.objects, n_sub_iteration=8, patch_shape=(512, 512),
                samples_per_epoch=steps + 1, use_gpu=args.gpu,
            )
            speed, setup_s = training_samples_per_s(config, warmup=1, steps=steps)
            row[f"{mode}_samples_per_s"] = speed
            row[f"{mode}_setup_s"] = setup_s
            print(f"{model_type} {mode}: {speed:.4f} samples/s (setup incl. embeddings {setup_s:.1f} s)", flush=True)
        row["ratio_decoder_over_full"] = row["decoder_samples_per_s"] / row["full_samples_per_s"]
        print(f"{model_type}: decoder/full = {row['ratio_decoder_over_full']:.1f}x", flush=True)
        results.append(row)
    print(json.dumps({"machine": machine(), "objects_per_batch": args.objects, "results": results}, indent=2))


if __name__ == "__main__":
    main()
