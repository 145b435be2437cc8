"""Shared by the benchmark scripts: the machine's description and the real HeLa dataset."""

from __future__ import annotations

import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from backend.config import TrainConfig
from backend.denormals import flush_denormals
from backend.training import SamFineTuner


def machine() -> str:
    """One line naming the hardware and software the figures were taken on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{os.cpu_count()} CPU cores ({cpu}), {memory_gib:.0f} GiB, {gpu}; "
        f"Python {platform.python_version()}, torch {torch.__version__}, {torch.get_num_threads()} torch threads"
    )


def setting_value(text: str) -> int | float | str:
    """A ``key=value`` setting's value from the command line: an int, a float, else the text (``constant``)."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def start_bench(prefix: str) -> Path:
    """Start a CPU learning benchmark: torch uses ``$OMP_NUM_THREADS`` threads (1 by default, so
    runs compare on a shared machine) with denormal floats flushed to zero, as training does
    (``backend.denormals``), the machine and its load are printed, and a fresh work folder named
    ``<prefix>...`` is made in the temporary directory and returned."""
    # before any PyTorch work starts its threads, which inherit it: a bench that scores a model before
    # it trains one would otherwise train with one thread computing denormals (SamFineTuner sets it late)
    flush_denormals()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    print(machine(), "| load:", os.getloadavg(), flush=True)
    return Path(tempfile.mkdtemp(prefix=prefix))


def hela_dataset(folder: Path) -> Path:
    """The demo's training dataset of real HeLa frames (6 train, 2 val; 700 x 1100)."""
    from napari_raysam.demo import build_datasets

    folder.mkdir(parents=True, exist_ok=True)
    return build_datasets(folder)[0]


def training_samples_per_s(config: TrainConfig, warmup: int, steps: int) -> tuple[float, float]:
    """Train without validation until ``warmup + steps`` optimiser steps are done.

    Returns (samples/s over the ``steps`` steps after the warm-up, seconds the fine-tuner
    took to set up: model, data and, in decoder mode, the embeddings).
    """
    start = time.perf_counter()
    step_ends: list[float] = []
    tuner = SamFineTuner(config, progress=lambda epoch, step, total: step_ends.append(time.perf_counter()))
    setup_s = time.perf_counter() - start
    tuner.validate = lambda: (0.0, 0.0)  # not timed, not needed
    epoch = 0
    while len(step_ends) < warmup + steps:
        tuner.run_epoch(epoch)
        epoch += 1
    timed = step_ends[warmup - 1: warmup + steps]  # the step before the first timed one ends the warm-up
    return config.batch_size * steps / (timed[-1] - timed[0]), setup_s
