"""SAM state for one image at a time: the model, the image's embeddings, prompts -> masks.

The lifecycle is segment-anything's ``SamPredictor``'s: :meth:`SamSession.set_model`, then
:meth:`SamSession.set_image` (embeddings read from the disk cache or computed), then any
number of :meth:`SamSession.segment` and :meth:`SamSession.automatic_segmentation` calls.
Images larger than ``TILING_THRESHOLD`` on a side are embedded tile by tile with micro-sam's
tiling, so even 10,000 x 10,000 pixels fit in memory. Automatic segmentation uses micro-sam's
instance segmentation decoder when the model carries one (``AIS``), else its point-grid automatic
mask generator (``AMG``).

Threads: ``set_image`` and ``automatic_segmentation`` are slow and meant to run in a worker
thread; while one of them runs, nothing else may be called on the session (the widget
disables its buttons). The exception is :meth:`SamSession.cache_embeddings` (the next image of
a series, computed ahead) and :meth:`SamSession.uncertainty` (which image to annotate next): they
use a predictor of their own, so they may run in another worker while the current image is
segmented; one lock keeps it and ``set_image`` from computing the
same cache entry twice.

Embedding cache: ``<cache_dir>/embeddings/<encoder fingerprint[:16]>/<content_key(rgb)[:32]>.zarr``,
written by ``micro_sam.util.precompute_image_embeddings`` into a hidden sibling folder and
renamed into place once complete, so an interrupted computation is never read back. Entries
are not evicted; delete the folder to reclaim space.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from micro_sam.prompt_based_segmentation import (
    segment_from_box,
    segment_from_box_and_points,
    segment_from_points,
)
from micro_sam.util import precompute_image_embeddings, set_precomputed
from segment_anything import SamPredictor

from backend.atomic import staging_folder
from backend.dataset import SampleEmbedding
from backend.models import LoadedModel, build_instance_decoder, load_model
from backend.uncertainty import POINTS_PER_SIDE, point_confidences, uncertainty
from napari_raysam.annotator.annotations import default_cache_dir
from napari_raysam.annotator.automatic import AIS, AMG, segment_automatically
from napari_raysam.annotator.image_source import content_key
from napari_raysam.annotator.progress import MicroSamProgress, ProgressCallback
from napari_raysam.annotator.prompts import ObjectPrompt

TILE_SHAPE = (1024, 1024)
HALO = (256, 256)
TILING_THRESHOLD = 2048  # images with a side longer than this are embedded tile-wise


class SessionError(ValueError):
    """The session cannot do what was asked yet; the message says what to do first."""


def embedding_cache_path(cache_dir: Path, encoder_fingerprint: str, rgb: np.ndarray) -> Path:
    """Where the embeddings of the SAM input ``rgb`` ((H, W, 3) uint8) by that encoder are cached."""
    return Path(cache_dir) / "embeddings" / encoder_fingerprint[:16] / f"{content_key(rgb)[:32]}.zarr"


def read_cached_embedding(cache_dir: Path, encoder_fingerprint: str, rgb: np.ndarray) -> SampleEmbedding | None:
    """The cached whole-image embedding of ``rgb`` by that encoder, as a dataset sample carries it.

    None when it was never computed, or the image was embedded in tiles (a dataset stores one
    ``(256, 64, 64)`` embedding per image), or the cache file cannot be read.
    """
    path = embedding_cache_path(cache_dir, encoder_fingerprint, rgb)
    if not path.exists() or max(rgb.shape[:2]) > TILING_THRESHOLD:
        return None
    try:
        group = zarr.open_group(str(path), mode="r")
        features = np.asarray(group["features"][:])[0]
        return SampleEmbedding(
            features, encoder_fingerprint, tuple(group.attrs["input_size"]), tuple(group.attrs["original_size"])
        )
    except Exception as error:  # noqa: BLE001 - the cache is disposable; training computes what is missing
        warnings.warn(f"cannot read the cached embeddings in {path} ({error}); training will compute them")
        return None


class SamSession:
    """One SAM model and the embeddings of the image being annotated.

    Attributes:
        cache_dir: root of the embedding cache (``<state_dir>/cache`` by default).
        device: torch device the model runs on, e.g. ``"cpu"`` or ``"cuda"``.
        model: the loaded model, None until :meth:`set_model`.
        predictor: ``segment_anything.SamPredictor`` around ``model.sam``, None until then.
    """

    def __init__(self, cache_dir: Path | None = None, device: str = "cpu") -> None:
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.device = device
        self.model: LoadedModel | None = None
        self.predictor: SamPredictor | None = None
        self._background_predictor: SamPredictor | None = None  # cache_embeddings' own: predictors hold an image's state
        self._computing = threading.Lock()  # held while embeddings are computed into the cache
        self._decoder: torch.nn.Module | None = None  # micro-sam's instance segmentation decoder, if any
        self._embeddings: dict[str, Any] | None = None  # micro-sam's ImageEmbeddings of the image
        self._image_shape: tuple[int, int] | None = None
        self._tiled = False

    # --- model and image ------------------------------------------------------------------------

    def set_model(self, source: str) -> bool:
        """Load the model at ``source`` (anything ``backend.models.load_model`` accepts).

        A model that carries micro-sam's instance segmentation decoder gets it built here, for
        :meth:`automatic_segmentation`.

        Returns:
            True if an image is set and its embeddings stay valid (the new model has the same
            image encoder, e.g. a decoder-only fine-tune); else False, and the image is reset:
            call :meth:`set_image` again.

        Raises:
            backend.models.ModelError: if the model cannot be loaded (the session is unchanged).
        """
        loaded = load_model(source, self.device)
        decoder = build_instance_decoder(loaded, self.device)
        keeps_image = (
            self._embeddings is not None
            and self.model is not None
            and self.model.encoder_fingerprint == loaded.encoder_fingerprint
        )
        self.model, self.predictor, self._decoder = loaded, _predictor(loaded), decoder
        self._background_predictor = _predictor(loaded)
        if not keeps_image:
            self.reset_image()
        return keeps_image

    def set_image(self, rgb: np.ndarray, progress: ProgressCallback | None = None) -> None:
        """Make ``rgb`` the image to segment: read its embeddings from the cache or compute them.

        Args:
            rgb: ``(H, W, 3)`` uint8 SAM input (``napari_raysam.annotator.image_source.sam_rgb``).
            progress: called as ``progress(done, total)`` from the calling thread: at the start,
                per tile while computing tiled embeddings, and at the end.

        Raises:
            SessionError: if no model is chosen or ``rgb`` is not ``(H, W, 3)`` uint8.
        """
        rgb = self._checked_input(rgb)
        self.reset_image()
        report = MicroSamProgress(progress)
        tiled = max(rgb.shape[:2]) > TILING_THRESHOLD
        path = self._cache_path(rgb)
        embeddings = self._read_cache(rgb, path, tiled)
        if embeddings is None:
            with self._computing:  # cache_embeddings may be computing this very image: then it is read
                embeddings = self._read_cache(rgb, path, tiled)
                if embeddings is None:
                    with staging_folder(path) as staging:
                        self._precompute(rgb, staging, tiled, report)
                    # Reopened from its final place: tiled features are read lazily from that folder.
                    embeddings = self._precompute(rgb, path, tiled, MicroSamProgress(None))
        self._embeddings = embeddings
        self._image_shape = (int(rgb.shape[0]), int(rgb.shape[1]))
        self._tiled = tiled
        report.finish()

    def cache_embeddings(self, rgb: np.ndarray, progress: ProgressCallback | None = None) -> bool:
        """Compute the embeddings of ``rgb`` into the disk cache, leaving the current image as it is.

        For the next image of a series, so that :meth:`set_image` only reads them when it comes.
        Meant for a worker thread; unlike the other methods it may run while the current image is
        segmented, since it uses a predictor of its own (around the same model, read only).

        Args:
            rgb: ``(H, W, 3)`` uint8 SAM input, as for :meth:`set_image`.
            progress: called as ``progress(done, total)``, as for :meth:`set_image`.

        Returns:
            True if they were computed; False if the cache held them already.

        Raises:
            SessionError: if no model is chosen or ``rgb`` is not ``(H, W, 3)`` uint8.
        """
        rgb = self._checked_input(rgb)
        model, predictor = self.model, self._background_predictor  # as they are now: set_model may replace them
        path = embedding_cache_path(self.cache_dir, model.encoder_fingerprint, rgb)
        with self._computing:
            if path.exists():
                return False
            report = MicroSamProgress(progress)
            with staging_folder(path) as staging:
                self._precompute(rgb, staging, max(rgb.shape[:2]) > TILING_THRESHOLD, report, predictor)
            predictor.reset_image()  # frees the features it kept
            report.finish()
        return True

    def uncertainty(self, rgb: np.ndarray, points_per_side: int = POINTS_PER_SIDE) -> float:
        """How unsure the current model is about ``rgb``: 0 = sure of every mask, 1 = of none.

        ``backend.uncertainty``'s score (predicted IoU x stability of the masks of a
        ``points_per_side`` x ``points_per_side`` grid of point prompts; per tile for a tiled
        image, all tiles' points together), from the cached embeddings, computed into the cache
        first if missing. Like :meth:`cache_embeddings` it uses the session's background
        predictor, so it may run in a worker while the current image is segmented; seconds on a
        CPU (one decoder pass per 64 points).

        Raises:
            SessionError: if no model is chosen or ``rgb`` is not ``(H, W, 3)`` uint8.
        """
        rgb = self._checked_input(rgb)
        self.cache_embeddings(rgb)
        model, predictor = self.model, self._background_predictor  # as they are now: set_model may replace them
        tiled = max(rgb.shape[:2]) > TILING_THRESHOLD
        with self._computing:
            path = embedding_cache_path(self.cache_dir, model.encoder_fingerprint, rgb)
            embeddings = self._precompute(rgb, path, tiled, MicroSamProgress(None), predictor)
            confidences = []
            for tile in range(len(embeddings["features"])) if tiled else [None]:
                set_precomputed(predictor, embeddings, tile_id=tile)
                confidences.append(point_confidences(predictor, points_per_side))
            predictor.reset_image()
        return uncertainty(np.concatenate(confidences))

    def is_cached(self, rgb: np.ndarray) -> bool:
        """Whether the embeddings of ``rgb`` for the current model are on disk (loading vs. computing)."""
        return self.model is not None and self._cache_path(np.asarray(rgb)).exists()

    def reset_image(self) -> None:
        """Forget the current image (its embeddings stay cached on disk)."""
        self._embeddings = None
        self._image_shape = None
        self._tiled = False
        if self.predictor is not None:
            self.predictor.reset_image()

    @property
    def image_shape(self) -> tuple[int, int] | None:
        """``(H, W)`` of the current image, None if no image is set."""
        return self._image_shape

    @property
    def tiled(self) -> bool:
        """Whether the current image is embedded tile-wise."""
        return self._tiled

    @property
    def automatic_mode(self) -> str | None:
        """The method :meth:`automatic_segmentation` uses with the current model: ``AIS`` ("ais") when
        it carries micro-sam's instance segmentation decoder, else ``AMG`` ("amg"); None without a model."""
        if self.model is None:
            return None
        return AIS if self._decoder is not None else AMG

    def _checked_input(self, rgb: np.ndarray) -> np.ndarray:
        """``rgb`` as an array, once a model is chosen and it is SAM's ``(H, W, 3)`` uint8 input."""
        if self.model is None:
            raise SessionError("choose a model first")
        rgb = np.asarray(rgb)
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise SessionError(
                f"the SAM input must be an (H, W, 3) uint8 image; got {rgb.shape} {rgb.dtype}: "
                f"make it with napari_raysam.annotator.image_source.sam_rgb"
            )
        return rgb

    def _cache_path(self, rgb: np.ndarray) -> Path:
        assert self.model is not None
        return embedding_cache_path(self.cache_dir, self.model.encoder_fingerprint, rgb)

    def _precompute(
        self, rgb: np.ndarray, save_path: Path, tiled: bool, report: MicroSamProgress, predictor: SamPredictor | None = None
    ) -> dict[str, Any]:
        """micro-sam's embeddings of ``rgb``: read from ``save_path`` if it holds them, else computed
        there by ``predictor`` (default: the session's)."""
        return precompute_image_embeddings(
            predictor or self.predictor,
            rgb,
            save_path=str(save_path),
            ndim=2,
            tile_shape=TILE_SHAPE if tiled else None,
            halo=HALO if tiled else None,
            verbose=True,  # micro-sam calls pbar_init/pbar_update only when verbose
            pbar_init=report.init,
            pbar_update=report.update,
        )

    def _read_cache(self, rgb: np.ndarray, path: Path, tiled: bool) -> dict[str, Any] | None:
        """The cached embeddings at ``path``; None if there are none, or (with a warning) if they cannot be used."""
        if not path.exists():
            return None
        try:
            return self._precompute(rgb, path, tiled, MicroSamProgress(None))
        # The cache is disposable: whatever makes it unreadable (a deleted chunk, other tiling,
        # a file from another micro-sam version) is cured by computing it again.
        except Exception as error:  # noqa: BLE001
            warnings.warn(f"cannot use the cached embeddings in {path} ({error}); computing them again")
            return None

    # --- segmentation ---------------------------------------------------------------------------

    def segment(
        self,
        points: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
    ) -> np.ndarray:
        """Segment one object from point and/or box prompts.

        Args:
            points: ``(N, 2)`` float YX pixel coordinates (napari order). Points outside the
                image are dropped.
            point_labels: ``(N,)`` 1 for a positive (object) point, 0 for a negative one;
                None: all positive.
            box: ``(4,)`` ``[y0, x0, y1, x1]`` pixel coordinates; clipped to the image.

        Returns:
            ``(H, W)`` bool mask of the object.

        Raises:
            SessionError: if no image is set, every point is outside the image (and there is
                no box), the box lies outside the image, or there is neither a positive point
                nor a box.
        """
        if self._embeddings is None or self._image_shape is None:
            raise SessionError("compute the embeddings first")
        points, labels = self._points_inside(points, point_labels, has_box=box is not None)
        if box is not None:
            box = self._clipped_box(box)
        if box is None and not (labels == 1).any():
            raise SessionError("add a positive point or a box")

        if box is None:
            masks = segment_from_points(self.predictor, points, labels, image_embeddings=self._embeddings)
        elif len(points) == 0:
            masks = segment_from_box(self.predictor, box, image_embeddings=self._embeddings)
        else:
            try:
                masks = segment_from_box_and_points(
                    self.predictor, box, points, labels, image_embeddings=self._embeddings
                )
            except RuntimeError as error:
                if not (self._tiled and "tile" in str(error)):
                    raise
                raise SessionError(
                    "on this large image the box and the points fall into different tiles: "
                    "keep the points near the box's centre, or segment with the box alone"
                ) from error
        return np.asarray(masks[0], dtype=bool)

    def segment_objects(
        self, objects: Sequence[ObjectPrompt], progress: ProgressCallback | None = None
    ) -> np.ndarray:
        """Segment several objects, each from its own prompts (micro-sam's batched segmentation).

        Each object is segmented as :meth:`segment` does it. Where masks overlap, the pixel goes
        to the smaller object, so an object drawn inside or beside a larger one stays whole.

        Args:
            objects: the objects' prompts (:func:`napari_raysam.annotator.prompts.object_prompts`).
            progress: called as ``progress(done, total)`` after each object.

        Returns:
            ``(H, W)`` uint32 labels: object ``k`` of ``objects`` has id ``k + 1``; an object
            whose mask came out empty has no pixels.

        Raises:
            SessionError: as :meth:`segment`, naming the object (``"object 3 of 5: ..."``).
        """
        if self._image_shape is None:
            raise SessionError("compute the embeddings first")
        report = MicroSamProgress(progress)
        report.init(len(objects))
        masks = []
        for done, prompt in enumerate(objects, 1):
            try:
                masks.append(self.segment(prompt.points, prompt.labels, prompt.box))
            except SessionError as error:
                raise SessionError(f"object {done} of {len(objects)}: {error}" if len(objects) > 1 else str(error)) from error
            report.update()
        labels = np.zeros(self._image_shape, np.uint32)
        for index in sorted(range(len(masks)), key=lambda k: -int(masks[k].sum())):  # largest first: smaller ones on top
            labels[masks[index]] = index + 1
        report.finish()
        return labels

    def _points_inside(
        self, points: np.ndarray | None, point_labels: np.ndarray | None, has_box: bool
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(N, 2)`` float YX points inside the image and their ``(N,)`` int labels."""
        if points is None:
            return np.zeros((0, 2)), np.zeros(0, dtype=int)
        points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        labels = (
            np.ones(len(points), dtype=int)
            if point_labels is None
            else np.asarray(point_labels).astype(int).reshape(-1)
        )
        if len(labels) != len(points):
            raise SessionError(
                f"got {len(points)} points but {len(labels)} point labels; give one label per point"
            )
        # napari draws pixel (i, j) over [i - 0.5, i + 0.5) x [j - 0.5, j + 0.5).
        last = np.array(self._image_shape) - 1
        inside = np.all((points >= -0.5) & (points < last + 0.5), axis=1)
        if len(points) and not inside.any() and not has_box:
            raise SessionError("all points are outside the image; click on the object in the image")
        # Clipped onto the pixels they were drawn on: micro-sam's tiling drops points left of 0.
        return np.clip(points[inside], 0, last), labels[inside]

    def _clipped_box(self, box: np.ndarray) -> np.ndarray:
        """``[y0, x0, y1, x1]`` ordered and clipped to the image (exclusive max, as micro-sam)."""
        y0, x0, y1, x1 = np.asarray(box, dtype=np.float64).reshape(4)
        height, width = self._image_shape
        (y0, y1), (x0, x1) = np.clip(sorted((y0, y1)), 0, height), np.clip(sorted((x0, x1)), 0, width)
        if y1 <= y0 or x1 <= x0:
            raise SessionError("the box lies outside the image or has no area; draw it around the object")
        return np.array([y0, x0, y1, x1])

    def automatic_segmentation(self, progress: ProgressCallback | None = None, **settings: float | int) -> np.ndarray:
        """Segment every object without prompts, with the method :attr:`automatic_mode` names.

        ``settings``: the thresholds and ``min_object_size`` of
        :func:`napari_raysam.annotator.automatic.segment_automatically`, which runs it; ``progress``
        is called as ``progress(done, total)``. Returns ``(H, W)`` uint32 instance ids, 0 = background.

        Raises:
            SessionError: if no image is set.
        """
        if self._embeddings is None or self._image_shape is None:
            raise SessionError("compute the embeddings first")
        return segment_automatically(
            self.predictor, self._embeddings, self._image_shape, tiling=(TILE_SHAPE, HALO) if self._tiled else None,
            decoder=self._decoder,
            progress=progress, **settings,
        )


def _predictor(loaded: LoadedModel) -> SamPredictor:
    """A ``SamPredictor`` around ``loaded``'s model, named as micro-sam's embedding cache checks it."""
    predictor = SamPredictor(loaded.sam)
    # micro-sam checks these against a cached embedding file before reading it; they name
    # the image encoder only, so the cache is shared by fine-tunes that kept the encoder.
    predictor.model_type = loaded.model_type
    predictor.model_name = loaded.model_type
    predictor._hash = loaded.encoder_fingerprint
    return predictor
