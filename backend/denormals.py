"""Flushing denormal floats to zero on the CPU: training a SAM decoder that has learned makes many.

Once a decoder predicts confidently, a training step's loss and gradients are full of values below
float32's smallest normal number (~1.2e-38), and x86 CPUs compute with such denormal numbers many
times slower than with normal ones. Measured on 2 cores (docs/BENCHMARKS.md): a fast-recipe step of
random ``vit_t`` took 0.11 s when the decoder was new and 0.27 s after 2.5 minutes of training, 0.12 s
with denormals flushed; on one thread 0.40 s and 0.18 s. So every run slowed down as it learned, its
last epochs at less than half speed. Flushing changes nothing a mask shows: values that small are lost
in any sum with a normal number. The same decoder's inference (the annotator's prompt answer) took the
same time either way, so only training flushes.
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
