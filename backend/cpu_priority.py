"""How much of the CPU a training process takes: the niceness of the calling thread, so that work
in the background leaves the cores to what a person waits for on the same computer, and as many
PyTorch threads as the CPUs Ray reserved for it."""

from __future__ import annotations

import os
import threading

RAY_WORKER_NICENESS = 15
"""Ray starts its worker processes (a Ray Train worker among them) at this niceness."""
LOWEST = 19


def lower_cpu_priority(niceness: int) -> None:
    """Give the calling thread at least ``niceness``; threads it starts afterwards (PyTorch's OpenMP
    threads among them) inherit it, so call it before they start. On Linux niceness is per thread.
    Nothing happens where there is no niceness (Windows)."""
    try:
        thread = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, thread, max(os.getpriority(os.PRIO_PROCESS, thread), niceness))
    except (AttributeError, OSError):
        pass


def use_reserved_cpus(cpus: int) -> None:
    """Run PyTorch's CPU work on ``cpus`` threads, the CPUs Ray reserved for this process.

    Ray sets ``OMP_NUM_THREADS`` for its workers only where the environment that started Ray had
    none; one inherited from there (a shell's setting; HPC modules set it to the node's cores) gave
    every worker that many threads, and two Ray Train workers of 2 threads each on 2 cores trained
    an epoch ~4x slower than one worker alone (docs/BENCHMARKS.md)."""
    import torch  # here: the job's driver imports this module before it knows whether it trains

    torch.set_num_threads(cpus)
