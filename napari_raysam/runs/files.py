"""Reading a run directory (design contract 2) from the client, incrementally.

The training job writes ``metrics.jsonl`` (one line per epoch), ``progress.json`` (after every
step) and ``model/`` (last). The client reads them while the job runs, so reads must tolerate a
line being written right now and a file rewritten after a resume. This is the client's one
reader of those files: the CLI, the dock and the benchmarks use it. A run directory is a local
folder or an object-store location (``backend.storage``): the client reads it from the storage
itself, never assuming it shares the cluster's disk.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from backend.run_directory import kept_epoch
from backend.storage import Location, StorageError, download_folder, file_sha256, location

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
PROGRESS_FILE = "progress.json"
BASELINE_FILE = "baseline.json"
MODEL_FOLDER = "model"
MODEL_META = "meta.json"
MODEL_WEIGHTS = "model.safetensors"


class MetricsReader:
    """Reads ``metrics.jsonl`` of a run from where it stopped last time.

    Only new bytes are read on each :meth:`read`; a half-written last line waits for the next
    call; a file that shrank (rewritten after a resume) is read again from its start.
    """

    def __init__(self, run_dir: Location | str) -> None:
        self.path = location(run_dir) / METRICS_FILE
        self.lines: list[dict] = []
        self._offset = 0

    def read(self) -> list[dict]:
        """All epoch lines so far (one dict per finished epoch, in order)."""
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return self.lines
        if size < self._offset:
            self.lines, self._offset = [], 0
        if size == self._offset:
            return self.lines
        with self.path.open("rb") as file:
            file.seek(self._offset)
            chunk = file.read(size - self._offset)
        complete = chunk[: chunk.rfind(b"\n") + 1]
        for line in complete.splitlines():
            if line.strip():
                self.lines.append(json.loads(line))
        self._offset += len(complete)
        return self.lines


def read_progress(run_dir: Location | str) -> dict | None:
    """``progress.json`` (epoch, epochs, step, steps_per_epoch, ...), or None before the first step."""
    try:
        return json.loads((location(run_dir) / PROGRESS_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def read_baseline(run_dir: Location | str) -> dict | None:
    """``baseline.json``: the base model's ``val_loss`` and ``val_iou`` before training, or None."""
    try:
        return json.loads((location(run_dir) / BASELINE_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def model_folder(run_dir: Location | str) -> Location | None:
    """The run's exported model folder (contract 3), or None until it is complete."""
    folder = location(run_dir) / MODEL_FOLDER
    return folder if (folder / MODEL_META).is_file() else None


def model_written_ns(run_dir: Location | str) -> int | None:
    """When the run's model folder was completed (its ``meta.json``'s mtime, ns), or None while there is none.

    The folder is renamed into place whole (uploaded with ``meta.json`` last to an object store), so a
    later export of the same run gives a new time.
    """
    try:
        return (location(run_dir) / MODEL_FOLDER / MODEL_META).stat().st_mtime_ns
    except FileNotFoundError:
        return None


@dataclass(frozen=True)
class RunRecord:
    """One run of a storage folder, as the run history lists it."""

    name: str
    run_dir: Location
    created: datetime
    base_model: str
    mode: str
    images: int | None
    """Annotated images the run trained and validated on (None when the submitter did not say)."""
    val_iou: float | None
    """The best epoch's validation IoU; None before the first epoch."""
    model: Location | None
    """The exported model folder; None while the run has not finished with one."""


def read_record(run_dir: Location | str) -> RunRecord | None:
    """The history entry of ``run_dir``, or None when it is not a run directory."""
    run_dir = location(run_dir)
    try:
        config = json.loads((run_dir / CONFIG_FILE).read_text())
        created = datetime.fromtimestamp((run_dir / CONFIG_FILE).stat().st_mtime, timezone.utc)
    except (OSError, json.JSONDecodeError):
        return None
    metrics = MetricsReader(run_dir).read()
    best = kept_epoch(metrics)
    images = config.get("extra", {}).get("images")
    return RunRecord(
        name=run_dir.name,
        run_dir=run_dir,
        created=created,
        base_model=str(config.get("model", "")),
        mode=str(config.get("mode", "")),
        images=int(images) if images is not None else None,
        val_iou=float(best["val_iou"]) if best is not None else None,
        model=model_folder(run_dir),
    )


def run_history(storage: Location | str) -> list[RunRecord]:
    """Every run directory in ``storage``, newest first (an unreadable one is skipped)."""
    storage = location(storage)
    if not storage.is_dir():
        return []
    records = [read_record(entry) for entry in storage.iterdir() if entry.is_dir()]
    return sorted((r for r in records if r is not None), key=lambda r: r.created, reverse=True)


def fetch_model(run_dir: Location | str, destination: Path) -> Path:
    """Copy the run's model folder to the local ``destination`` (replaced atomically) and check its sha256.

    Returns ``destination``.

    Raises:
        FileNotFoundError: the run has no complete model folder (yet).
        StorageError: the copied weights do not match the sha256 in its ``meta.json`` (``destination``
            is left as it was).
    """
    source = model_folder(run_dir)
    if source is None:
        raise FileNotFoundError(
            f"{run_dir} has no model yet: the run has not finished successfully "
            "(`napari-raysam runs list` shows its state)"
        )

    def check(copy: Path) -> None:
        recorded = json.loads((copy / MODEL_META).read_text()).get("sha256")
        if file_sha256(copy / MODEL_WEIGHTS) != recorded:
            raise StorageError(
                f"the model copied from {source} does not match the sha256 in its {MODEL_META}: the copy or "
                "the stored model is damaged; fetch it again, and if that fails, train the run again"
            )

    return download_folder(source, Path(destination), check=check)
