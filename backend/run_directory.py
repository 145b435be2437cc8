"""Writing a run directory (design contract 2), without the trainer's heavy imports.

The job's driver creates the folder and Ray Train's controller passes the worker function
around; neither should pay for importing micro-sam and segment-anything (seconds each on a
small machine), so this module needs only the standard library, the config and the storage
layer (fsspec, light).

    config.json     the TrainConfig as submitted
    baseline.json   validation of the base model before any training: val_loss, val_iou
    metrics.jsonl   one line per epoch (epoch, train_loss, val_loss, val_iou, lr, samples_per_s, elapsed_s)
    progress.json   after every step: epoch, epochs, step, steps_per_epoch, elapsed_s, budget_s
    model/          the exported model (contract 3), written last: the kept epoch's (``kept_epoch``)
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from backend.config import TrainConfig
from backend.storage import (
    Location, append_line, is_remote, make_folder, plain_reason, storing, upload_folder, write_text,
)

if TYPE_CHECKING:
    from backend.training import EpochRecord, SamFineTuner


def kept_epoch(metrics: list[dict]) -> dict | None:
    """The ``metrics.jsonl`` line of the epoch whose model a run exports: the highest val IoU
    (the first of equals; what the user will see), or None before any epoch ended.

    Not the lowest val loss: in the fast recipe the loss rose again while the IoU still climbed
    (on the HeLa val frames the lowest-loss epoch had 0.10 where a later one reached 0.20).
    """
    return max(metrics, key=lambda line: line["val_iou"], default=None)


REMOTE_PROGRESS_EVERY_S = 2.0
"""In an object store ``progress.json`` is one PUT per write: at most one every 2 s (and each epoch's last step)."""


class RunDirectory:
    """Writes contract 2: ``config.json``, ``baseline.json``, ``metrics.jsonl``, ``progress.json``, ``model/``.

    The folder is a local path or an object-store location (``backend.storage``): every write is
    atomic either way, and the model folder is uploaded with its ``meta.json`` last.
    """

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.path: Location = config.run_dir
        self._progress_written = 0.0
        self.clock: Callable[[], float] = lambda: 0.0
        """Seconds trained so far, for ``progress.json``; the trainer sets it to its ``elapsed``."""

    def create(self) -> None:
        """Make the folder and write ``config.json``; fails clearly when storage is not writable."""
        try:
            make_folder(self.path)
            write_text(self.path / "config.json", self.config.to_json())
        except Exception as error:  # OSError on a disk; botocore's own errors from an object store
            raise PermissionError(
                f"cannot write the run directory {self.path}: {plain_reason(error)}. "
                "Pick a --storage folder or bucket you can write to (on a cluster: storage every node can reach)."
            ) from error

    def metrics(self) -> list[dict]:
        """The epoch lines so far; a torn last line (a worker killed while appending it) is left out."""
        try:
            text = (self.path / "metrics.jsonl").read_text()
        except FileNotFoundError:
            return []
        lines = []
        for line in text.splitlines():
            try:
                lines.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return lines

    def restore_metrics(self, checkpointed: list[dict] | None, start: int) -> list[dict]:
        """After a (re)start before epoch ``start``: make ``metrics.jsonl`` the lines of epochs ``0..start-1``.

        The checkpoint's own lines (``checkpointed``) are the record: a worker killed after storing an
        epoch's checkpoint but before appending its line would otherwise leave that epoch out. A
        checkpoint written without them keeps the file's lines before ``start`` (and drops a torn one).
        Returns the lines kept.
        """
        kept = checkpointed if checkpointed is not None else [m for m in self.metrics() if m["epoch"] < start]
        with self.storing("the epoch lines of metrics.jsonl"):
            write_text(self.path / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in kept))
        return list(kept)

    def append_metrics(self, record: EpochRecord) -> None:
        with self.storing(f"epoch {record.epoch}'s line of metrics.jsonl"):
            append_line(self.path / "metrics.jsonl", json.dumps(record.to_dict()))

    def write_baseline(self, val_loss: float, val_iou: float) -> None:
        """The base model's validation before training: the "before" of the run's before/after."""
        with self.storing("the base model's validation (baseline.json)"):
            write_text(self.path / "baseline.json", json.dumps({"val_loss": val_loss, "val_iou": val_iou}))

    def write_progress(self, epoch: int, step: int, steps_per_epoch: int) -> None:
        """Write ``progress.json``. It only shows the way: a storage that refuses it for a moment (an object
        store's blip) costs a line in the log, not the run; a lasting outage ends the run at the epoch's
        checkpoint, which must be stored."""
        now = time.monotonic()
        if is_remote(self.path) and step < steps_per_epoch and now - self._progress_written < REMOTE_PROGRESS_EVERY_S:
            return
        self._progress_written = now
        budget = self.config.minutes * 60 if self.config.minutes is not None else None
        progress = {
            "epoch": epoch, "epochs": self.config.epochs, "step": step, "steps_per_epoch": steps_per_epoch,
            "elapsed_s": round(self.clock(), 2), "budget_s": budget,
        }
        try:
            write_text(self.path / "progress.json", json.dumps(progress))
        except Exception as error:  # OSError on a disk, botocore's own errors from an object store
            print(f"could not update {self.path / 'progress.json'} ({error}); training goes on", flush=True)

    def export_model(self, tuner: SamFineTuner) -> Location:
        """Write the best epoch's model into ``<run>/model`` (contract 3); in an object store, meta.json last."""
        from backend.models import META_FILE, save_model_folder  # in the worker, which has imported it anyway

        best = {"best_epoch": tuner.best["epoch"], "best_val_iou": tuner.best["val_iou"]}

        def save(folder: Path) -> Path:
            return save_model_folder(
                tuner.best_sam(), folder,
                model_type=tuner.loaded.model_type,
                base_model=self.config.model,
                mode=self.config.mode,
                dataset_fingerprint=tuner.dataset.fingerprint(),
                metrics={**best, "epochs": self.metrics()},
                config=self.config.to_dict(),
            )

        destination = self.path / "model"
        if not is_remote(self.path):
            with self.storing("the trained model"):
                return save(destination)
        with tempfile.TemporaryDirectory() as local:  # written here whole, then uploaded
            model = save(Path(local) / "model")
            with self.storing("the trained model"):
                upload_folder(model, destination, last=META_FILE)
        return destination

    def storing(self, what: str) -> contextlib.AbstractContextManager[None]:
        """A block of writes into the run folder: a failed one is a StorageError that names ``what`` was lost."""
        return storing(str(self.path), what)
