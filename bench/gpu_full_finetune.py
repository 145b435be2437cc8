"""GPU benchmark of SAM fine-tuning without Ray: throughput, GPU utilisation and memory per setting.

Builds a synthetic cell dataset, then for each setting of a small sweep (training mode x batch
size x data-loader workers) constructs a ``SamFineTuner``, trains one warm-up epoch and times the
next epoch(s). Reported per setting: samples/s (from the epoch record), GPU utilisation sampled
with NVML every ``--poll-ms`` during the timed epochs' training steps (mean and median %), and
the peak GPU memory PyTorch allocated; ``val_s`` is the rest of an epoch after its last step
(validation and the copy of the best weights). Decoder mode has no data loader (embeddings are computed
once), so it runs once per batch size and gives the decoder/full throughput ratio.

Usage (on a GPU machine)::

    python bench/gpu_full_finetune.py --out results.json
    python bench/gpu_full_finetune.py --batch-sizes 1,2 --loader-workers 0,4 --max-seconds 200 --out r.json

``--smoke`` runs a tiny model on two tiny images for one step per epoch, on the CPU when no GPU
is present, to check that the script works.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import skimage.draw
import torch
from micro_sam.training.util import ConvertToSamInputs
from segment_anything.utils.transforms import ResizeLongestSide

from backend.config import TrainConfig
from backend.dataset import SampleInput, open_dataset, write_samples
from backend.dataset.crops import TrainingCrops
from backend.training import SamFineTuner

_GIB = 1024**3


@dataclass(frozen=True)
class Setting:
    """One point of the sweep; ``loader_workers`` is None for decoder mode, which has no loader."""

    mode: str
    batch_size: int
    loader_workers: int | None

    @property
    def label(self) -> str:
        workers = "-" if self.loader_workers is None else str(self.loader_workers)
        return f"{self.mode} B={self.batch_size} W={workers}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path,
                        help="JSON file for the results (rewritten after every setting)")
    parser.add_argument("--smoke", action="store_true", help="tiny model, 2 tiny images, 1 step per epoch (CPU check)")
    parser.add_argument("--model", default="random:vit_b", help="model source (default: random:vit_b)")
    parser.add_argument("--modes", default="full,decoder",
                        help="comma-separated training modes (default: full,decoder)")
    parser.add_argument("--batch-sizes", default="1,2,4", help="comma-separated batch sizes (default: 1,2,4)")
    parser.add_argument("--loader-workers", default="0,8", help="comma-separated loader workers (default: 0,8)")
    parser.add_argument("--timed-samples", type=int, default=32,
                        help="samples per timed phase; full/lora: crops per epoch, decoder: epochs enough for this")
    parser.add_argument("--max-seconds", type=float, default=330.0,
                        help="skip settings that would end after this many seconds from the start (default: 330)")
    parser.add_argument("--n-train", type=int, default=16)
    parser.add_argument("--n-val", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=1024, help="synthetic images are square, this many pixels")
    parser.add_argument("--cells", type=int, default=40, help="cells per synthetic image")
    parser.add_argument("--patch", type=int, default=512, help="training crop size (full/lora)")
    parser.add_argument("--n-objects", type=int, default=25, help="n_objects_per_batch")
    parser.add_argument("--n-sub-iteration", type=int, default=8)
    parser.add_argument("--precision", default="auto", help="auto (bf16 on GPUs that have it), fp32, bf16, fp16")
    parser.add_argument("--poll-ms", type=float, default=100.0, help="GPU utilisation sampling interval")
    parser.add_argument("--val-probe", action=argparse.BooleanOptionalAction, default=True,
                        help="after the sweep, time validation's CPU prompt sampling on one whole val image")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.smoke:
        args.model, args.batch_sizes, args.loader_workers = "random:tiny", "1", "0"
        args.timed_samples, args.n_train, args.n_val = 1, 1, 1
        args.image_size, args.cells, args.patch = 128, 6, 96
        args.n_objects, args.n_sub_iteration = 3, 2
    args.modes = _csv(args.modes, str)
    args.batch_sizes = _csv(args.batch_sizes, int)
    args.loader_workers = _csv(args.loader_workers, int)
    return args


def _csv(text: str, kind: type) -> list:
    return [kind(item) for item in text.split(",") if item.strip()]


def sweep(args: argparse.Namespace) -> list[Setting]:
    """Settings in the order they run: per batch size the full/lora loader variants, then decoder,
    so that a run cut short by ``--max-seconds`` still has every mode at the small batch sizes."""
    settings = []
    for batch_size in args.batch_sizes:
        for mode in args.modes:
            workers = [None] if mode == "decoder" else args.loader_workers
            settings.extend(Setting(mode, batch_size, w) for w in workers)
    return settings


# -- data ---------------------------------------------------------------------------------


def synthetic_cells(rng: np.random.Generator, size: int, n_cells: int) -> tuple[np.ndarray, np.ndarray]:
    """A ``(3, size, size)`` uint16 image of bright ellipses on noise and its ``(size, size)`` uint32 labels."""
    labels = np.zeros((size, size), np.uint32)
    low, high = max(3.0, size / 64), max(5.0, size / 28)  # radii ~16..37 px at 1024
    for k in range(n_cells):
        radii = rng.uniform(low, high, size=2)
        row, col = rng.uniform(radii, size - radii)
        rr, cc = skimage.draw.ellipse(row, col, radii[0], radii[1], shape=labels.shape, rotation=rng.uniform(0, np.pi))
        labels[rr, cc] = k + 1
    image = rng.normal(100, 10, (3, size, size)).astype(np.float32)
    image += (labels > 0) * rng.uniform(300, 1000, 3).astype(np.float32)[:, None, None]
    return np.clip(image, 0, 65535).astype(np.uint16), labels


def make_dataset(path: Path, args: argparse.Namespace) -> None:
    rng = np.random.default_rng(args.seed)
    samples = [
        SampleInput(*synthetic_cells(rng, args.image_size, args.cells), split=split, source=f"{split}_{i}")
        for split, count in (("train", args.n_train), ("val", args.n_val))
        for i in range(count)
    ]
    write_samples(path, samples)


def objects_per_crop(path: Path, args: argparse.Namespace, n_crops: int = 16) -> float:
    """Mean number of objects in a training crop: caps how many of ``--n-objects`` a step can use."""
    crops = TrainingCrops(open_dataset(path), "train", patch_shape=(args.patch, args.patch), length=n_crops,
                          seed=args.seed)
    return float(np.mean([len(np.unique(crops[i][1])) - 1 for i in range(n_crops)]))


# Validation prompt kinds in the order micro-sam's SamTrainer cycles them (val index % 4); the last
# two draw 1-4 positive and 0-4 negative points, here a fixed (2, 2).
_VAL_PROMPTS = {"point": (1, 0, False), "box": (0, 0, True), "points": (2, 2, False), "box+points": (2, 2, True)}


def probe_val_prompts(path: Path, args: argparse.Namespace, n_objects: int = 3) -> dict:
    """CPU seconds that sampling validation prompts takes on one whole val image, per prompt kind.

    ``SamFineTuner.validate`` samples prompts on whole images on the CPU while the GPU waits;
    negative points dilate every object's mask 10 times at full image size, so their cost grows
    with image area and object count. Timed for ``n_objects`` objects (to stay short), then
    scaled to ``--n-objects``. Val images with index % 4 in (2, 3) get the point kinds; the
    sweep's 2 val images do not.
    """
    dataset = open_dataset(path)
    sample_id = dataset.sample_ids("val")[0]
    labels = torch.from_numpy(dataset.labels(sample_id).astype(np.float32))[None, None]
    image = torch.zeros(1).expand(1, 3, *labels.shape[-2:])  # only its shape is read
    convert = ConvertToSamInputs(transform=ResizeLongestSide(1024))
    per_object = {}
    for name, (n_positive, n_negative, boxes) in _VAL_PROMPTS.items():
        start = time.perf_counter()
        convert(image, labels, n_positive, n_negative, boxes, n_objects)
        per_object[name] = (time.perf_counter() - start) / n_objects
    objects = min(args.n_objects, dataset.n_objects(sample_id))
    return {
        "image": list(labels.shape[-2:]),
        "objects": objects,
        "s_per_image": {name: round(seconds * objects, 2) for name, seconds in per_object.items()},
        "torch_threads": torch.get_num_threads(),
    }


# -- GPU sampling ---------------------------------------------------------------------------


class GpuSampler:
    """Samples NVML GPU utilisation (%) in a background thread; ``None`` results without NVML."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self.samples: list[tuple[float, int, int]] = []  # (perf_counter, gpu %, memory-bus %)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._nvml = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(_nvml_index())
            self._nvml = pynvml
        except Exception as error:  # no pynvml, no driver, or a CPU-only run
            print(f"GPU utilisation not sampled: {type(error).__name__}: {error}", flush=True)

    @property
    def available(self) -> bool:
        return self._nvml is not None

    def driver_version(self) -> str | None:
        return self._nvml.nvmlSystemGetDriverVersion() if self.available else None

    def start(self) -> None:
        if not self.available:
            return
        self.samples = []
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        while not self._stop.is_set():
            rates = self._nvml.nvmlDeviceGetUtilizationRates(self._handle)
            self.samples.append((time.perf_counter(), rates.gpu, rates.memory))
            self._stop.wait(self.interval_s)

    def summary(self, windows: list[tuple[float, float]]) -> dict:
        """Mean and median utilisation over the samples inside any of the ``(start, end)`` windows."""
        inside = [s for s in self.samples if any(start <= s[0] <= end for start, end in windows)]
        if not inside:
            return {"gpu_util_mean": None, "gpu_util_median": None, "mem_util_mean": None, "util_samples": 0}
        gpu = [s[1] for s in inside]
        return {
            "gpu_util_mean": round(statistics.fmean(gpu), 1),
            "gpu_util_median": statistics.median(gpu),
            "mem_util_mean": round(statistics.fmean(s[2] for s in inside), 1),
            "util_samples": len(inside),
        }


def _nvml_index() -> int:
    """NVML index of the CUDA device in use (NVML ignores CUDA_VISIBLE_DEVICES)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    current = torch.cuda.current_device()
    ids = [v.strip() for v in visible.split(",") if v.strip()]
    return int(ids[current]) if ids and ids[current].isdigit() else current


# -- one setting ----------------------------------------------------------------------------


def run_setting(setting: Setting, args: argparse.Namespace, data: Path, storage: Path, sampler: GpuSampler,
                use_gpu: bool) -> dict:
    """Construct a fine-tuner for ``setting``, train a warm-up epoch, time the next epoch(s)."""
    decoder = setting.mode == "decoder"
    samples_per_epoch = math.ceil(args.timed_samples / setting.batch_size) * setting.batch_size
    timed_epochs = math.ceil(args.timed_samples / args.n_train) if decoder else 1
    config = TrainConfig(
        data=str(data), storage=str(storage), model=args.model, mode=setting.mode, use_gpu=use_gpu,
        batch_size=setting.batch_size, loader_workers=setting.loader_workers or 0,
        patch_shape=(args.patch, args.patch), n_objects_per_batch=args.n_objects,
        n_sub_iteration=args.n_sub_iteration, precision=args.precision, epochs=1 + timed_epochs,
        samples_per_epoch=None if decoder else samples_per_epoch, lr_schedule="constant", seed=args.seed,
    )
    if use_gpu:
        torch.cuda.reset_peak_memory_stats()
    step_times: list[float] = []
    start = time.perf_counter()
    tuner = SamFineTuner(config, progress=lambda epoch, step, steps: step_times.append(time.perf_counter()))
    setup_s = time.perf_counter() - start

    warmup = tuner.run_epoch(0)
    windows, records, val_s = [], [], []
    sampler.start()
    try:
        for epoch in range(1, 1 + timed_epochs):
            step_times.clear()
            epoch_start = time.perf_counter()
            records.append(tuner.run_epoch(epoch))
            epoch_end = time.perf_counter()
            # Training steps only, not validation; an epoch's last, partial step reports no progress.
            last_step = step_times[-1] if step_times else epoch_end
            windows.append((epoch_start, last_step))
            val_s.append(epoch_end - last_step)
    finally:
        sampler.stop()

    train_s = sum(end - begin for begin, end in windows)
    return {
        "mode": setting.mode,
        "batch_size": setting.batch_size,
        "loader_workers": setting.loader_workers,
        "samples_per_epoch": args.n_train if decoder else samples_per_epoch,
        "steps_per_epoch": tuner.steps_per_epoch,
        "timed_epochs": timed_epochs,
        "samples_per_s": round(statistics.fmean(r.samples_per_s for r in records), 3),
        "samples_per_s_epochs": [round(r.samples_per_s, 3) for r in records],
        "warmup_samples_per_s": round(warmup.samples_per_s, 3),
        "step_s": round(train_s / (tuner.steps_per_epoch * timed_epochs), 4),
        "setup_s": round(setup_s, 2),
        "epoch_elapsed_s": [round(r.elapsed_s, 2) for r in records],
        "val_s": round(statistics.fmean(val_s), 2),
        "autocast": str(tuner.autocast_dtype),
        "train_loss": round(records[-1].train_loss, 4),
        **sampler.summary(windows),
        "peak_mem_gib": round(torch.cuda.max_memory_allocated() / _GIB, 2) if use_gpu else None,
        "wall_s": round(time.perf_counter() - start, 1),
    }


# -- reporting ------------------------------------------------------------------------------


def machine_info(use_gpu: bool, sampler: GpuSampler) -> dict:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if use_gpu else None,
        "gpu_mem_gib": round(torch.cuda.get_device_properties(0).total_memory / _GIB, 1) if use_gpu else None,
        "bf16_supported": torch.cuda.is_bf16_supported() if use_gpu else None,
        "driver": sampler.driver_version(),
    }


def decoder_full_ratios(results: list[dict]) -> dict[str, float]:
    """Per batch size: decoder samples/s over the best full-mode samples/s (any loader workers)."""
    ratios = {}
    for batch_size in sorted({r["batch_size"] for r in results}):
        full = [r["samples_per_s"] for r in results if r["mode"] == "full" and r["batch_size"] == batch_size]
        dec = [r["samples_per_s"] for r in results if r["mode"] == "decoder" and r["batch_size"] == batch_size]
        if full and dec:
            ratios[str(batch_size)] = round(dec[0] / max(full), 2)
    return ratios


def table(results: list[dict]) -> str:
    header = f"{'mode':8} {'B':>2} {'W':>2} {'samples/s':>9} {'step s':>7} {'GPU% mean':>9} {'median':>6} " \
             f"{'peak GiB':>8} {'setup s':>7} {'val s':>6}"
    lines = [header, "-" * len(header)]
    for r in results:
        if "error" in r:
            lines.append(f"{r['mode']:8} {r['batch_size']:>2} {_dash(r['loader_workers']):>2} ERROR {r['error']}")
            continue
        lines.append(
            f"{r['mode']:8} {r['batch_size']:>2} {_dash(r['loader_workers']):>2} {r['samples_per_s']:>9.2f} "
            f"{r['step_s']:>7.3f} {_dash(r['gpu_util_mean']):>9} {_dash(r['gpu_util_median']):>6} "
            f"{_dash(r['peak_mem_gib']):>8} {r['setup_s']:>7.1f} {r['val_s']:>6.1f}"
        )
    return "\n".join(lines)


def _dash(value) -> str:
    return "-" if value is None else str(value)


def write_json(path: Path, report: dict) -> None:
    """Write atomically, so a run killed mid-write keeps the previous complete report."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    use_gpu = torch.cuda.is_available()
    if not use_gpu and not args.smoke:
        print("no GPU visible to PyTorch: this benchmark needs one (use --smoke for a CPU check)", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    sampler = GpuSampler(args.poll_ms / 1000)
    report = {
        "benchmark": "gpu_full_finetune",
        "machine": machine_info(use_gpu, sampler),
        "settings": {k: v for k, v in vars(args).items() if k != "out"} | {"out": str(args.out)},
        "results": [],
        "skipped": [],
    }
    print("machine:", json.dumps(report["machine"]), flush=True)

    with tempfile.TemporaryDirectory(prefix="raysam-bench-") as tmp:
        data = Path(tmp) / "cells.zarr"
        make_dataset(data, args)
        report["dataset"] = {
            "n_train": args.n_train, "n_val": args.n_val, "image": [3, args.image_size, args.image_size],
            "cells_per_image": args.cells, "objects_per_crop_mean": objects_per_crop(data, args),
            "build_s": round(time.perf_counter() - t0, 1),
        }
        print("dataset:", json.dumps(report["dataset"]), flush=True)

        longest: dict[str, float] = {}  # per mode, the longest setting so far: predicts the next one
        for setting in sweep(args):
            elapsed = time.perf_counter() - t0
            if elapsed + longest.get(setting.mode, 0.0) > args.max_seconds:
                print(f"skip {setting.label}: {elapsed:.0f} s used of --max-seconds {args.max_seconds:.0f}", flush=True)
                report["skipped"].append(setting.label)
                continue
            print(f"run  {setting.label} ...", flush=True)
            try:
                result = run_setting(setting, args, data, Path(tmp) / "runs", sampler, use_gpu)
            except Exception as error:  # e.g. out of GPU memory at a large batch: record it, go on
                traceback.print_exc()
                result = {"mode": setting.mode, "batch_size": setting.batch_size,
                          "loader_workers": setting.loader_workers, "error": f"{type(error).__name__}: {error}"[:500]}
            else:
                longest[setting.mode] = max(longest.get(setting.mode, 0.0), result["wall_s"])
                print("     " + json.dumps(result), flush=True)
            gc.collect()  # here, not in the except clause, whose traceback still holds the fine-tuner
            if use_gpu:
                torch.cuda.empty_cache()
            report["results"].append(result)
            report["decoder_over_full"] = decoder_full_ratios([r for r in report["results"] if "error" not in r])
            report["total_s"] = round(time.perf_counter() - t0, 1)
            write_json(args.out, report)

        if args.val_probe and time.perf_counter() - t0 < args.max_seconds:
            report["val_prompt_cpu_s"] = probe_val_prompts(data, args)
            print("validation prompt sampling on the CPU, per whole val image:", json.dumps(report["val_prompt_cpu_s"]),
                  flush=True)

    print("\n" + table(report["results"]), flush=True)
    print("decoder/full samples/s ratio per batch size:", json.dumps(report.get("decoder_over_full", {})), flush=True)
    report["total_s"] = round(time.perf_counter() - t0, 1)
    print(f"total {report['total_s']:.0f} s; JSON: {args.out}", flush=True)
    write_json(args.out, report)
    return 1 if any("error" in r for r in report["results"]) else 0


if __name__ == "__main__":
    sys.exit(main())
