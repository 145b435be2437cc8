"""Lowering the CPU priority (niceness) of the calling thread, so that work in the background
leaves the cores to what a person waits for on the same computer."""

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
