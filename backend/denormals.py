"""Flushing denormal floats to zero on the CPU, where a SAM decoder that has learned makes many.

A decoder that has learned attends sharply and predicts confidently, so its softmaxes and sigmoids,
and their gradients, are full of values below float32's smallest normal number (~1.2e-38). x86 CPUs
compute with such denormal numbers many times slower than with normal ones. Measured on 2 cores
(docs/BENCHMARKS.md): a fast-recipe step of random ``vit_t`` took 0.11 s when the decoder was new
and 0.27 s after 2.5 minutes of training, 0.12 s with denormals flushed; on one thread 0.40 s and
0.18 s. So every run slowed down as it learned, its last epochs at less than half speed. Values that
small change no mask.
"""

from __future__ import annotations

import torch


def flush_denormals() -> bool:
    """Make the calling thread, and every thread it starts afterwards, treat denormal floats as zero.

    The setting is per thread and a new thread inherits it from the one that starts it: call this
    before the process's first parallel PyTorch operation, which starts PyTorch's OpenMP threads
    (threads started before keep computing with denormals). Returns False where the CPU cannot
    (then nothing changes).
    """
    return torch.set_flush_denormal(True)
