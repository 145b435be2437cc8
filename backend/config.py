"""The training configuration: one validated dataclass, written to ``config.json`` of a run."""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from backend.storage import Location, location

MODES = ("decoder", "full", "lora")
"""decoder: image encoder frozen, embeddings computed once; full: every weight trains;
lora: low-rank adapters in the image encoder's attention (micro-sam's PEFT), decoder trains."""

RECIPES = ("fast", "micro-sam")
"""fast: decoder mode only, many objects per batched decoder pass, losses on the 256 x 256 logit
grid (backend.fast_recipe); micro-sam: micro-sam's iterative prompting step (every mode)."""
RECIPE_DEFAULTS = {
    # objects per image and step, prompting rounds, peak learning rates from random and from trained
    # weights, optimiser steps of linear warm-up to the peak (chosen by measurement, docs/BENCHMARKS.md)
    "fast": {"n_objects_per_batch": 32, "n_sub_iteration": 1, "lr": 1e-3, "lr_trained": 3e-4, "warmup_steps": 100},
    "micro-sam": {"n_objects_per_batch": 25, "n_sub_iteration": 8, "warmup_steps": 0},
}

LAUNCHERS = ("auto", "ray-train", "driver")
"""How a Ray job trains. ray-train: Ray Train workers (data parallel, on any node, restarted from the
last checkpoint after a failure); driver: the job's own process trains, as ``--no-ray`` does (one
worker: no Ray Train controller, helpers or worker process to start, so the first step comes seconds
sooner, and a failure ends the run, which ``runs resume`` continues); auto: driver for one worker on
a cluster started on this computer, ray-train otherwise (decided by the run client when it submits)."""

LR_SCHEDULES = ("cosine", "constant")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")

_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class ConfigError(ValueError):
    """A training setting is invalid; the message says which and how to fix it."""


@dataclass
class TrainConfig:
    """Everything a training run needs, validated when created.

    ``data`` and ``storage`` are local paths or object-store URIs (``s3://bucket/prefix``), reachable
    from wherever the run executes: for the embedded local Ray that is this computer; for a cluster,
    a shared filesystem or an object store (the run client uploads a local dataset there).
    """

    data: str
    """Dataset (contract 1), a ``.zarr`` folder or its upload in an object store (``backend.storage``)."""
    storage: str
    """Folder or object-store URI that receives the run directory ``<storage>/<run_name>/`` (contract 2)."""
    model: str = "vit_b_lm"
    """Starting weights: a micro-sam zoo name, a checkpoint path or ``random:<type>``."""
    mode: str = "decoder"
    recipe: str | None = None
    """fast or micro-sam (see RECIPES); None picks fast for decoder mode, micro-sam otherwise."""
    run_name: str = ""
    """Unique per submission; generated from time, model and mode when empty."""
    epochs: int = 10
    """Epochs to train; with ``minutes`` the most epochs that time may hold."""
    minutes: float | None = None
    """Time budget: training stops at the first optimiser step after this many minutes (counted
    from the first step: loading the model and computing embeddings come before) and the best
    model so far is exported."""
    lr: float | None = None
    """Peak learning rate; None picks the mode's default (see ``learning_rate``)."""
    lr_schedule: str = "cosine"
    warmup_steps: int | None = None
    """Optimiser steps of linear warm-up to the peak learning rate; None = the recipe's default (fast
    100: a fresh AdamW at its peak undoes the first steps' work; micro-sam 0)."""
    weight_decay: float = 1e-2
    batch_size: int = 1
    """Images (decoder mode) or crops (full/lora) per step and worker."""
    grad_accumulation: int = 1
    patch_shape: tuple[int, int] = (512, 512)
    """Crop size for full/lora modes (pixels, H x W); decoder mode trains on whole images."""
    min_objects: int = 1
    """A training crop contains at least this many objects."""
    samples_per_epoch: int | None = None
    """Training crops per epoch (full/lora) or image steps (fast recipe); None = one per training image
    (the fast recipe: at least ``fast_recipe.MIN_IMAGES_PER_EPOCH``)."""
    n_objects_per_batch: int | None = None
    """Objects per image and step; None = the recipe's default (fast 32, micro-sam 25)."""
    n_sub_iteration: int | None = None
    """Prompting rounds per step: corrective points from the error, previous logits fed back
    (micro-sam), or one corrective click per round and the previous logits half the time (fast);
    None = the recipe's default (fast 1, micro-sam 8). The CLI's ``--rounds``."""
    mask_prob: float = 0.5
    """Chance that a prompting round after the first also gets the previous logits as SAM's mask
    prompt (micro-sam's ``mask_prob``; both recipes)."""
    lora_rank: int = 4
    precision: str = "auto"
    """auto: bf16 autocast on a GPU that supports it, fp32 on CPU."""
    loader_workers: int = 0
    """Processes preparing training crops per worker (full/lora); 0 = in the training process."""
    workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: int = 1
    max_failures: int = 2
    """Worker failures Ray Train recovers from, resuming from the last epoch checkpoint."""
    launcher: str = "auto"
    """Who trains inside the Ray job: see LAUNCHERS."""
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form notes carried into meta.json (e.g. who submitted, from which widget)."""

    def __post_init__(self) -> None:
        self.patch_shape = tuple(int(s) for s in self.patch_shape)  # JSON gives lists
        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {', '.join(MODES)}, got '{self.mode}'")
        if self.recipe is None:
            self.recipe = "fast" if self.mode == "decoder" else "micro-sam"
        if self.recipe not in RECIPES:
            raise ConfigError(f"recipe must be one of {', '.join(RECIPES)}, got '{self.recipe}'")
        if self.recipe == "fast" and self.mode != "decoder":
            raise ConfigError(
                f"the fast recipe trains only the decoder on frozen embeddings; use --recipe micro-sam "
                f"with --mode {self.mode}, or --mode decoder"
            )
        defaults = RECIPE_DEFAULTS[self.recipe]
        if self.n_objects_per_batch is None:
            self.n_objects_per_batch = defaults["n_objects_per_batch"]
        if self.n_sub_iteration is None:
            self.n_sub_iteration = defaults["n_sub_iteration"]
        if self.warmup_steps is None:
            self.warmup_steps = defaults["warmup_steps"]
        if self.minutes is not None and not self.minutes > 0:
            raise ConfigError(f"minutes must be a time budget > 0 (e.g. 5) or empty, got {self.minutes}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got '{self.lr_schedule}'")
        if self.launcher not in LAUNCHERS:
            raise ConfigError(f"launcher must be one of {', '.join(LAUNCHERS)}, got '{self.launcher}'")
        if self.launcher == "driver" and self.workers != 1:
            raise ConfigError(
                f"the driver launcher trains in the job's one process; use --launcher ray-train (or auto) "
                f"for {self.workers} workers"
            )
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got '{self.precision}'")
        positive = {
            "epochs": self.epochs, "batch_size": self.batch_size, "grad_accumulation": self.grad_accumulation,
            "min_objects": self.min_objects, "n_objects_per_batch": self.n_objects_per_batch,
            "n_sub_iteration": self.n_sub_iteration, "lora_rank": self.lora_rank, "workers": self.workers,
            "cpus_per_worker": self.cpus_per_worker,
        }
        for name, value in positive.items():
            if int(value) != value or value < 1:
                raise ConfigError(f"{name} must be a whole number >= 1, got {value}")
        if self.lr is not None and not 0 < self.lr < 1:
            raise ConfigError(f"lr must be between 0 and 1 (typical: 1e-5 to 1e-4), got {self.lr}")
        if self.samples_per_epoch is not None and self.samples_per_epoch < 1:
            raise ConfigError(f"samples_per_epoch must be >= 1 or empty, got {self.samples_per_epoch}")
        if len(self.patch_shape) != 2 or min(self.patch_shape) < 64:
            raise ConfigError(f"patch_shape must be two sizes >= 64 pixels, got {self.patch_shape}")
        if not 0 <= self.mask_prob <= 1:
            raise ConfigError(f"mask_prob must be between 0 and 1, got {self.mask_prob}")
        if self.max_failures < 0 or self.warmup_steps < 0 or self.loader_workers < 0:
            raise ConfigError("max_failures, warmup_steps and loader_workers must be >= 0")
        if self.mode == "lora" and self.model.removeprefix("random:").startswith("vit_t"):
            raise ConfigError(
                "LoRA needs a ViT image encoder (vit_b, vit_l, vit_h or tiny); vit_t (MobileSAM) has none. "
                "Use --mode decoder or --mode full with vit_t, or pick a vit_b model for LoRA."
            )
        if not self.run_name:
            stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-%f")
            model = re.sub(r"[^A-Za-z0-9._-]", "_", Path(self.model).name)[:40]
            self.run_name = f"{stamp}-{model}-{self.mode}"
        if not _RUN_NAME.match(self.run_name):
            raise ConfigError(
                f"run_name '{self.run_name}' may only use letters, digits, '.', '_' and '-' (max 128 characters)"
            )

    @property
    def learning_rate(self) -> float:
        """The peak learning rate. The fast recipe: 1e-3 from random weights; 3e-4 from trained ones (a
        zoo model, a checkpoint, an earlier run's export as in the fine-tune dock's next round), where
        1e-3's first steps undo what the model knew. micro-sam's recipe: micro-sam's 1e-5 when the
        encoder trains and 1e-4 for the decoder alone."""
        if self.lr is not None:
            return self.lr
        if self.recipe == "fast":
            return RECIPE_DEFAULTS["fast"]["lr" if self.model.startswith("random:") else "lr_trained"]
        return 1e-4 if self.mode == "decoder" else 1e-5

    @property
    def run_dir(self) -> Location:
        """``<storage>/<run_name>``: a ``Path``, or a ``UPath`` when the storage is an object-store URI."""
        return location(self.storage) / self.run_name

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown training settings: {', '.join(unknown)}")
        return cls(**values)

    @classmethod
    def from_json(cls, path: str | Path) -> "TrainConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))
