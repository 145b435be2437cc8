"""Which torch devices the annotator can run SAM on: a GPU when there is one, else the CPU."""

from __future__ import annotations

import torch


def available_devices() -> list[str]:
    """The devices SAM can run on here, the fastest first: each CUDA GPU (``"cuda:0"``, ...), Apple's
    ``"mps"``, then ``"cpu"``, which is always there."""
    gpus = [f"cuda:{index}" for index in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    mps = ["mps"] if torch.backends.mps.is_available() else []
    return [*gpus, *mps, "cpu"]
