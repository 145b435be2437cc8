"""Never lose work: autosave of committed labels, and commits with undo.

Committed labels are saved after every commit under
``<cache_dir>/annotations/<content_key(raw slice)[:32]>/labels.npy`` (+ ``meta.json``), keyed by
the raw image slice, not SAM's input, so they come back whichever channels feed SAM.
"""

from __future__ import annotations

import json
import threading
import warnings
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from backend.atomic import write_file
from napari_raysam.cluster import state_dir

LABELS_FILE = "labels.npy"
META_FILE = "meta.json"

# One thread writes every background save, in the order asked (a later save of a file lands after an
# earlier one). Python waits for it at exit, so quitting napari never drops a queued save.
_WRITER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="napari-raysam-autosave")
_QUEUED: dict[Path, Future] = {}
"""The newest background save of each labels file (done or not)."""
_QUEUED_LOCK = threading.Lock()


def default_cache_dir() -> Path:
    """Where embeddings and autosaved labels live: ``<state_dir>/cache``."""
    return state_dir() / "cache"


class CommitError(ValueError):
    """An object cannot be committed; the message says what to do."""


class AnnotationStore:
    """Autosaved committed labels, one ``(H, W)`` uint32 array per image slice.

    Attributes:
        root: ``<cache_dir>/annotations``, one folder per image slice in it.
    """

    def __init__(self, cache_dir: Path | None = None) -> None:
        self.root = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / "annotations"

    def path(self, key: str) -> Path:
        """The ``labels.npy`` file of the slice with content key ``key``."""
        return self.root / key[:32] / LABELS_FILE

    def save(self, key: str, labels: np.ndarray, source: str = "") -> Path:
        """Save ``labels`` for the slice with content key ``key``; returns the file written.

        Each file is written next to its destination, flushed to disk and renamed into place,
        so a crash leaves the previous save intact. Costs one write of the whole array
        (4 bytes per pixel: 16 MB for 2048 x 2048).

        Args:
            key: ``image_source.content_key`` of the raw ``(C, H, W)`` slice.
            labels: ``(H, W)`` instance ids; stored as uint32.
            source: where the image came from (layer name), for the metadata.
        """
        labels = np.asarray(labels)
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "shape": list(labels.shape),
            "source": source,
            "saved": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        write_file(path, lambda file: np.save(file, labels.astype(np.uint32, copy=False)), durable=True)
        meta_text = json.dumps(meta, indent=2).encode()
        write_file(path.parent / META_FILE, lambda file: file.write(meta_text), durable=True)
        return path

    def save_in_background(
        self, key: str, labels: np.ndarray, source: str = "", failed: Callable[[Exception], None] | None = None,
    ) -> None:
        """``save`` on the autosave thread; returns at once. For a 10,000 x 10,000 image the write
        (400 MB, flushed to disk) takes ~0.5-1 s, which on napari's thread froze the viewer at
        every commit.

        ``labels`` is written as it is when the write starts, not copied (a copy costs about as much
        as the write): a change made to it meanwhile (a commit, the brush) must be followed by another
        save, as the annotator's are. Of several saves of one slice still waiting, only the newest is
        written. ``load`` (any store, any thread) waits for the slice's queued save. ``failed(error)``
        is called on the autosave thread when the write fails, whatever the reason
        (a full disk's OSError or anything else: a save that fails unseen loses work).
        """
        path = self.path(key)

        def write() -> None:
            with _QUEUED_LOCK:
                if _QUEUED.get(path) is not future:
                    return  # a newer save of this slice follows: it writes the labels as they are then
            try:
                self.save(key, labels, source)
            except Exception as error:  # noqa: BLE001 - on this thread no one else would ever see it
                if failed is not None:
                    failed(error)

        with _QUEUED_LOCK:  # held until ``future`` is bound, so ``write`` compares with it
            future = _WRITER.submit(write)
            _QUEUED[path] = future

    def load(self, key: str, shape: tuple[int, int]) -> np.ndarray | None:
        """The saved ``(H, W)`` uint32 labels of slice ``key``, or None; waits for its background save.

        None if nothing was saved or the saved labels have another shape; also None, with a
        warning naming the file, if the file cannot be read (never an exception).
        """
        path = self.path(key)
        with _QUEUED_LOCK:
            queued = _QUEUED.get(path)
        if queued is not None:
            wait((queued,))  # not result(): what went wrong there was the writer's to report (``failed``)
        if not path.is_file():
            return None
        try:
            labels = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as error:
            warnings.warn(f"the autosaved labels {path} cannot be read ({error}); starting without them")
            return None
        if labels.dtype != np.uint32 or labels.ndim != 2:
            warnings.warn(
                f"the autosaved labels {path} hold {labels.ndim}D {labels.dtype} data, not (H, W) "
                f"uint32 labels; starting without them"
            )
            return None
        return labels if labels.shape == tuple(shape) else None


@dataclass(frozen=True)
class _Step:
    """One undoable commit: the ids written into ``labels[box]`` (0 where nothing was written)."""

    box: tuple[slice, slice]
    written: np.ndarray  # labels[box] dtype, 0 or the new id per pixel
    ids: tuple[int, ...]


class CommitHistory:
    """Commits objects into an ``(H, W)`` labels array, with undo.

    A commit writes only into background pixels (0): already committed objects are never
    overwritten, so no commit can destroy earlier work; where a new object overlaps them it
    gets only the free pixels.

    Args:
        max_steps: how many commits can be undone; older ones are forgotten (bounds memory:
            a step keeps the bounding box of what it wrote).
    """

    def __init__(self, max_steps: int = 100) -> None:
        self._steps: deque[_Step] = deque(maxlen=max_steps)

    @property
    def can_undo(self) -> bool:
        """Whether there is a commit to undo."""
        return bool(self._steps)

    @property
    def last_box(self) -> tuple[slice, slice] | None:
        """Rows and columns of the labels that the last commit (the one ``undo`` takes back) wrote in; None without one."""
        return self._steps[-1].box if self._steps else None

    def clear(self) -> None:
        """Forget all commits (when another image is annotated)."""
        self._steps.clear()

    def commit_labels(
        self, labels: np.ndarray, instance_labels: np.ndarray, origin: tuple[int, int] = (0, 0)
    ) -> list[int]:
        """Commit every object of ``instance_labels`` with a new id, on background pixels only, as
        one undo step: the objects SAM proposed for the prompts, or an automatic segmentation.

        Args:
            labels: ``(H, W)`` integer instance ids (0 = background), changed in place.
            instance_labels: ``(h, w)`` integer instance ids of the objects to add, their pixel
                ``(0, 0)`` at pixel ``origin`` (row, column) of ``labels``: the whole image, or
                just the proposed objects' bounding box (a large image's commit then touches
                only that part of it).

        Returns:
            The new ids, consecutive from ``labels.max() + 1`` in the order of the objects'
            ids; objects lying entirely on committed ones get none.

        Raises:
            CommitError: if every object lies entirely on committed objects (nothing is added).
        """
        instance_labels = np.asarray(instance_labels)
        region = _region(labels, instance_labels.shape, origin)
        free = (instance_labels != 0) & (labels[region] == 0)
        object_ids, new_values = np.unique(instance_labels[free], return_inverse=True)
        if not len(object_ids):
            what = "object lies" if len(np.unique(instance_labels)) <= 2 else "objects lie"
            raise CommitError(f"the {what} entirely on already committed objects; undo or erase them first")
        first = int(labels.max()) + 1
        box = _bounding_box(free)
        written = np.zeros(free[box].shape, labels.dtype)
        written[free[box]] = first + new_values.reshape(-1)
        ids = tuple(range(first, first + len(object_ids)))
        self._write(labels, tuple(slice(s.start + o, s.stop + o) for s, o in zip(box, origin)), written, ids)
        return list(ids)

    def undo(self, labels: np.ndarray) -> list[int]:
        """Remove the last commit step's objects from ``labels`` in place.

        Only pixels that still carry the id that step wrote are reset to 0, so hand edits
        made since (painting over the object with another id) survive.

        Returns:
            The ids the step had committed; ``[]`` if there is nothing to undo.
        """
        if not self._steps:
            return []
        step = self._steps.pop()
        region = labels[step.box]
        region[(step.written != 0) & (region == step.written)] = 0
        return list(step.ids)

    def _write(
        self, labels: np.ndarray, box: tuple[slice, slice], written: np.ndarray, ids: tuple[int, ...]
    ) -> None:
        """Write the non-zero pixels of ``written`` into ``labels[box]``; record them as one step."""
        region = labels[box]
        new = written != 0
        region[new] = written[new]
        self._steps.append(_Step(box, written, ids))


def crop_to_objects(labels: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
    """``(H, W)`` labels cut to the bounding box of their objects (a copy), and the image pixel
    (row, column) of the crop's pixel (0, 0); with no object, a ``(1, 1)`` crop at ``(0, 0)``."""
    found = labels != 0
    if not found.any():
        return labels[:1, :1].copy(), (0, 0)
    box = _bounding_box(found)
    return labels[box].copy(), (box[0].start, box[1].start)


def _bounding_box(mask: np.ndarray) -> tuple[slice, slice]:
    """Row and column slices around the True pixels of a non-empty ``(H, W)`` mask."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1)


def _region(labels: np.ndarray, shape: tuple[int, ...], origin: tuple[int, int]) -> tuple[slice, slice]:
    """The part of ``(H, W)`` ``labels`` that an ``(h, w)`` array placed at ``origin`` covers."""
    if labels.ndim != 2 or len(shape) != 2:
        raise ValueError(f"labels {labels.shape} and mask {shape} must both be (H, W) arrays")
    (top, left), (height, width) = origin, shape
    if top < 0 or left < 0 or top + height > labels.shape[0] or left + width > labels.shape[1]:
        raise ValueError(f"a {shape} mask at {tuple(origin)} does not lie inside the {labels.shape} labels")
    return slice(top, top + height), slice(left, left + width)


def object_count(labels: np.ndarray) -> int:
    """Distinct non-zero ids in ``labels``. Seconds for a large image (``np.unique``): call it in a worker."""
    return int(np.count_nonzero(np.unique(labels)))


def proposal_message(labels: np.ndarray) -> str:
    """What the status line says about ``labels``, the objects proposed for prompts 1, 2, ... (0 where
    a prompt found nothing). Seconds for a large image (``np.unique``): call it in the worker."""
    found = object_count(labels)
    if found <= 1:
        return f"proposed object: {int(np.count_nonzero(labels))} pixels. Commit [C] keeps it; add points to correct it"
    empty = int(labels.max()) - found
    return f"proposed {found} objects" + (f" ({empty} prompts gave none)" if empty else "") + ". Commit [C] keeps them all"
