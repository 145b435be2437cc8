"""Writing a run directory (design contract 2), without the trainer's heavy imports.

The job's driver creates the folder and Ray Train's controller passes the worker function
around; neither should pay for importing micro-sam and segment-anything (seconds each on a
small machine), so this module needs only the standard library and the config.

    config.json     the TrainConfig as submitted
    baseline.json   validation of the base model before any training: val_loss, val_iou
    metrics.jsonl   one line per epoch (epoch, train_loss, val_loss, val_iou, lr, samples_per_s, elapsed_s)
    progress.json   after every step: epoch, epochs, step, steps_per_epoch, elapsed_s, budget_s
    model/          the exported model (contract 3), written last
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from backend.atomic import write_text
from backend.config import TrainConfig

if TYPE_CHECKING:
    from backend.training import EpochRecord, SamFineTuner


class RunDirectory:
    """Writes contract 2: ``config.json``, ``baseline.json``, ``metrics.jsonl``, ``progress.json``, ``model/``."""

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.path = config.run_dir
        self.clock: Callable[[], float] = lambda: 0.0
        """Seconds trained so far, for ``progress.json``; the trainer sets it to its ``elapsed``."""

    def create(self) -> None:
        """Make the folder and write ``config.json``; fails clearly when storage is not writable."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            write_text(self.path / "config.json", self.config.to_json())
        except OSError as error:
            raise PermissionError(
                f"cannot write the run directory {self.path}: {error.strerror}. "
                "Pick a --storage folder you can write to (on a cluster: storage every node can reach)."
            ) from error

    def metrics(self) -> list[dict]:
        path = self.path / "metrics.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def keep_metrics_before(self, epoch: int) -> None:
        """After a resume, drop lines of epochs that are trained again."""
        kept = [m for m in self.metrics() if m["epoch"] < epoch]
        write_text(self.path / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in kept))

    def append_metrics(self, record: EpochRecord) -> None:
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record.to_dict()) + "\n")

    def write_baseline(self, val_loss: float, val_iou: float) -> None:
        """The base model's validation before training: the "before" of the run's before/after."""
        write_text(self.path / "baseline.json", json.dumps({"val_loss": val_loss, "val_iou": val_iou}))

    def write_progress(self, epoch: int, step: int, steps_per_epoch: int) -> None:
        budget = self.config.minutes * 60 if self.config.minutes is not None else None
        progress = {
            "epoch": epoch, "epochs": self.config.epochs, "step": step, "steps_per_epoch": steps_per_epoch,
            "elapsed_s": round(self.clock(), 2), "budget_s": budget,
        }
        write_text(self.path / "progress.json", json.dumps(progress))

    def export_model(self, tuner: SamFineTuner) -> Path:
        from backend.models import save_model_folder  # in the worker, which has imported it anyway

        metrics = self.metrics()
        best = {"best_epoch": tuner.best["epoch"], "best_val_loss": tuner.best["val_loss"]}
        return save_model_folder(
            tuner.best_sam(), self.path / "model",
            model_type=tuner.loaded.model_type,
            base_model=self.config.model,
            mode=self.config.mode,
            dataset_fingerprint=tuner.dataset.fingerprint(),
            metrics={**best, "epochs": metrics},
            config=self.config.to_dict(),
        )
