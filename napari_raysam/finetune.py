"""The fine-tune round trip without Qt: settings, and "export what is new, then submit".

The fine-tune dock (``widgets/finetune.py``) calls :func:`submit_finetune` in a worker thread
and follows the run with :class:`napari_raysam.runs.RunClient`; everything here is reachable
by tests without a viewer.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from backend.atomic import write_text
from backend.config import MODES, TrainConfig
from backend.models import check_source
from backend.storage import Location, location, make_folder, plain_reason, unreachable_storage
from napari_raysam.annotator.annotations import AnnotationStore
from napari_raysam.annotator.export import AnnotatedImage, EmbeddingSource, ExportResult, export_annotations
from napari_raysam.cluster import (
    Cluster,
    connect,
    default_cpus_per_worker,
    running_local_cluster,
    start_local_cluster,
    state_dir,
)
from napari_raysam.runs import RunClient, RunInfo

SETTINGS_FILE = "finetune_settings.json"


class FinetuneError(ValueError):
    """The fine-tune cannot start; the message says what to do."""


@dataclass
class FinetuneSettings:
    """What the fine-tune dock's fields hold; saved between napari sessions (the token is not).

    Empty paths and names mean the defaults: the embedded local Ray, ``$NAPARI_RAYSAM_HOME/runs``,
    ``$NAPARI_RAYSAM_HOME/datasets/annotations.zarr`` and the annotator's current model.
    """

    address: str = ""
    storage: str = ""
    dataset: str = ""
    base_model: str = ""
    mode: str = "decoder"
    epochs: int = 10
    minutes: float = 0.0
    """Time budget in minutes; 0 trains all ``epochs``."""
    workers: int = 1
    gpus_per_worker: int = 0
    lr: float = 0.0
    """Peak learning rate; 0 uses the recipe's default."""
    objects_per_batch: int = 0
    """Objects per image and step; 0 uses the recipe's default."""
    load_when_done: bool = True
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise FinetuneError(f"mode must be one of {', '.join(MODES)}, got '{self.mode}'")
        for name in ("epochs", "workers"):
            if int(getattr(self, name)) < 1:
                raise FinetuneError(f"{name} must be at least 1")
        if self.gpus_per_worker not in (0, 1):
            raise FinetuneError("GPU per worker is 0 (CPU) or 1")
        if self.minutes < 0 or self.lr < 0 or self.objects_per_batch < 0:
            raise FinetuneError("minutes, learning rate and objects per batch are 0 (default) or more")

    @property
    def storage_path(self) -> Location:
        """The storage folder, or its object-store location for a URI (``s3://bucket/runs``)."""
        return location(self.storage.strip()) if self.storage.strip() else state_dir() / "runs"

    @property
    def dataset_path(self) -> Path:
        return Path(self.dataset).expanduser() if self.dataset else state_dir() / "datasets" / "annotations.zarr"

    @classmethod
    def load(cls, path: Path | None = None) -> FinetuneSettings:
        """The saved settings, or the defaults when none were saved or they cannot be read."""
        path = path or state_dir() / SETTINGS_FILE
        try:
            values = json.loads(Path(path).read_text())
            known = {f.name for f in dataclasses.fields(cls)}
            return cls(**{k: v for k, v in values.items() if k in known})
        except (OSError, ValueError, TypeError):
            return cls()

    def save(self, path: Path | None = None) -> None:
        write_text(path or state_dir() / SETTINGS_FILE, json.dumps(dataclasses.asdict(self), indent=2))


def open_cluster(address: str, token: str | None = None) -> Cluster:
    """The cluster at ``address``, or the embedded local Ray (started on first use) when it is empty."""
    return connect(address, token) if address.strip() else start_local_cluster()


def running_cluster(address: str, token: str | None = None) -> Cluster | None:
    """The cluster at ``address``; for an empty one the embedded local Ray if it runs, else None.

    What the fine-tune dock connects to when it opens: looking at the dock starts nothing (the
    embedded cluster outlives napari, for its runs' sake); the first fine-tune starts it.
    """
    return connect(address, token) if address.strip() else running_local_cluster()


@dataclass(frozen=True)
class Submission:
    """A fine-tune that was exported and submitted."""

    client: RunClient
    run: RunInfo
    export: ExportResult
    seconds: dict[str, float]
    """Where the time went: connect, export, submit."""


def submit_finetune(
    settings: FinetuneSettings,
    images: Sequence[AnnotatedImage],
    store: AnnotationStore,
    *,
    annotator_model: str | None,
    embeddings: EmbeddingSource | None,
    token: str | None = None,
    cluster: Cluster | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Submission:
    """Export what is new of ``images`` into the settings' dataset, then submit a training run.

    The annotator's embeddings go into the dataset when the base model is the annotator's model
    (same image encoder), so a decoder-mode job computes none.

    Args:
        annotator_model: the annotator's loaded model source (the default base model).
        cluster: an already connected cluster; else connected (or started) here.

    Raises:
        FinetuneError, DatasetError, ModelError, ClusterError, RunError, PermissionError: each
        with a message that says what to do; annotations are untouched.
    """
    seconds: dict[str, float] = {}
    base_model = settings.base_model.strip() or annotator_model
    if not base_model:
        raise FinetuneError("load a model in the SAM annotator first, or name a base model to fine-tune")
    start = time.perf_counter()
    cluster = cluster or open_cluster(settings.address, token)
    seconds["connect"] = time.perf_counter() - start
    check_source(base_model, offline=cluster.is_local)
    storage = settings.storage_path
    _check_writable(storage)

    start = time.perf_counter()
    export = export_annotations(
        images, settings.dataset_path, store,
        embeddings=embeddings if base_model == annotator_model else None, progress=progress,
    )
    seconds["export"] = time.perf_counter() - start
    if export.train == 0 or export.val == 0:
        raise FinetuneError(
            f"{settings.dataset_path.name} has {export.train} train and {export.val} val images: annotate at "
            "least two images (one is kept for validation) before fine-tuning"
        )
    config = TrainConfig(
        data=str(settings.dataset_path), storage=str(storage), model=base_model, mode=settings.mode,
        epochs=settings.epochs, minutes=settings.minutes or None, lr=settings.lr or None,
        n_objects_per_batch=settings.objects_per_batch or None, workers=settings.workers,
        use_gpu=settings.gpus_per_worker > 0,
        cpus_per_worker=default_cpus_per_worker(settings.workers, local=cluster.is_local),
        extra={**settings.extra, "images": export.train + export.val, "submitted_from": "napari fine-tune dock"},
    )
    start = time.perf_counter()
    client = RunClient(cluster)
    run = client.submit(config, images=export.train + export.val)
    seconds["submit"] = time.perf_counter() - start
    return Submission(client, run, export, seconds)


def _check_writable(storage: Location) -> None:
    try:
        make_folder(storage)
        probe = storage / f".write-test-{time.time_ns()}"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise PermissionError(
            f"cannot write to the storage folder {storage} ({plain_reason(error)}): choose a folder you can "
            "write to"
        ) from error
    except Exception as error:  # an object store: botocore's connection and credential errors
        raise PermissionError(unreachable_storage(str(storage), error)) from error

