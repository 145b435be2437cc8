"""Peak memory and time of embedding one image: global attention in chunks of heads vs all at once.

Each variant runs in a fresh process: build a random SAM (``backend.models.build_sam``), then embed a
1024 x 1024 image with ``SamPredictor`` as the annotator and a decoder-mode training worker do,
``--repeats`` times. "segment-anything" puts its own ``Attention`` back in the global-attention
blocks: the computation micro-sam's ``precompute_image_embeddings`` runs, the peer. Printed: the
process's resident memory with the model loaded, its peak while embedding (``ru_maxrss``), the rise,
and each embedding's seconds; then the ratios.

    OMP_NUM_THREADS=2 .venv/bin/python bench/embedding_memory.py [--models vit_b] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np
import psutil
import torch
from segment_anything import SamPredictor
from segment_anything.modeling.image_encoder import Attention

from backend.models import build_sam, set_predictor_image
from common import machine

VARIANTS = ("segment-anything", "chunked")


def measure(model_type: str, variant: str, repeats: int) -> dict:
    """Embed in this process; returns the figures of one variant."""
    sam = build_sam(model_type)
    if variant == "segment-anything":
        for block in sam.image_encoder.blocks:
            block.attn.__class__ = Attention
    predictor = SamPredictor(sam)
    image = np.random.default_rng(0).uniform(0, 255, (3, 1024, 1024)).astype(np.float32)
    loaded_gb = psutil.Process().memory_info().rss / 1e9
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        with torch.no_grad():
            set_predictor_image(predictor, image)
        seconds.append(round(time.perf_counter() - start, 2))
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # kB on Linux
    return {"model": model_type, "variant": variant, "loaded_gb": round(loaded_gb, 2), "peak_gb": round(peak_gb, 2),
            "rise_gb": round(peak_gb - loaded_gb, 2), "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="vit_b", help="model types, comma separated (ViT encoders: vit_b, vit_l, vit_h)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(*args.one, args.repeats)), flush=True)
        return
    print(machine(), flush=True)
    for model_type in args.models.split(","):
        results = {}
        for variant in VARIANTS:
            output = subprocess.run(
                [sys.executable, __file__, "--one", model_type, variant, "--repeats", str(args.repeats)],
                check=True, capture_output=True, text=True,
            ).stdout
            results[variant] = json.loads(output.strip().splitlines()[-1])
            print(json.dumps(results[variant]), flush=True)
        peer, ours = results["segment-anything"], results["chunked"]
        print(json.dumps({"model": model_type, "rise_ratio_chunked_over_peer": round(ours["rise_gb"] / peer["rise_gb"], 3),
                          "time_ratio_chunked_over_peer": round(min(ours["seconds"]) / min(peer["seconds"]), 3)}))


if __name__ == "__main__":
    main()
