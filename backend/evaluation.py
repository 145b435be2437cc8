"""Compare SAM models on an annotation dataset with micro-sam's (elf's) metric definitions.

Three numbers per model and split:

- ``box_iou``: for every ground-truth object, the box around it (XYXY, exclusive max, as
  ``micro_sam.util.get_centers_and_bounding_boxes`` and micro-sam's evaluation derive it) is the
  prompt; single-mask output; IoU with the object. Mean over all objects of the split.
- ``point_iou``: one positive point per object at the maximum of the distance to the object's
  boundary (the point farthest inside it, micro-sam's ``mode="v"`` centre); multimask output and
  the mask with the highest predicted IoU, as micro-sam does for a single positive point.
- ``msa`` / ``sa50``: micro-sam's ``AutomaticMaskGenerator`` (point grid, micro-sam's ``generate``
  defaults) turned into an instance segmentation by ``mask_data_to_segmentation`` and scored by
  ``elf.evaluation.mean_segmentation_accuracy``; mean over images, as micro-sam reports them.

Images without objects are left out of all metrics: there is nothing to prompt, and elf scores
any prediction on an empty ground truth as 0.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from elf.evaluation import mean_segmentation_accuracy
from micro_sam.instance_segmentation import AutomaticMaskGenerator
from segment_anything import SamPredictor
from segment_anything.modeling import Sam

from backend.dataset import Dataset, open_dataset
from backend.models import load_model, set_predictor_image
from backend.object_prompts import check_image_pair, check_pair_count, mask_iou, object_prompts, scoring

# The automatic mask generator costs one decoder pass per grid point. vit_t's decoder took
# 0.03 s per point on a 16-core CPU, so 12 x 12 = 144 points (plus 0.4 s for the embedding) is
# about 5 s for a 700 x 1100 image (some ten times that on 2 cores); micro-sam's default of
# 32 x 32 would be about seven times that.
DEFAULT_POINTS_PER_SIDE = 12

# Prompts per decoder call: bounds the (batch, 3, H, W) float logits of multimask output.
PROMPT_BATCH_SIZE = 32

ProgressCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class EvaluationResult:
    """How well one model segments one split of one dataset.

    ``box_iou`` and ``point_iou`` are means over all ``n_objects`` objects; ``msa`` and ``sa50``
    are means over the ``n_images`` images and are None when automatic segmentation was skipped
    (then ``amg_points_per_side`` is None too). ``seconds`` is the wall-clock time of the whole
    evaluation (model load, data read, inference).
    """

    model: str
    dataset: str
    split: str
    n_images: int
    n_objects: int
    box_iou: float
    point_iou: float
    msa: float | None
    sa50: float | None
    amg_points_per_side: int | None
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """Return the fields as a JSON-serialisable dict (plain str, int, float and None)."""
        return dataclasses.asdict(self)


def evaluate_images(
    sam: Sam,
    images: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    *,
    automatic: bool = True,
    points_per_side: int = DEFAULT_POINTS_PER_SIDE,
    progress: ProgressCallback | None = None,
    return_segmentations: bool = False,
) -> dict[str, Any]:
    """Score a SAM model on images with instance labels.

    Args:
        sam: The model (``segment_anything`` or ``mobile_sam`` ``Sam``); it is run in eval mode
            and its training mode is restored afterwards.
        images: Per image a ``(3, H, W)`` float32 array in SAM's RGB range ``[0, 255]``.
        labels: Per image the ``(H, W)`` instance ids (uint32, 0 = background).
        automatic: Whether to run the automatic mask generator for ``msa``/``sa50`` (the slow part).
        points_per_side: Side of the automatic mask generator's point grid.
        progress: Called as ``progress(done, total)`` after each image.
        return_segmentations: Whether to add ``"segmentations"``: per input image, its
            ``(H, W)`` uint32 automatic instance segmentation (requires ``automatic``).

    Returns:
        ``{"n_images", "n_objects", "box_iou", "point_iou", "msa", "sa50",
        "amg_points_per_side"}`` (plus ``"segmentations"`` if asked); ``n_images`` counts the
        images with at least one object, the ones the metrics average over.

    Raises:
        ValueError: if the inputs do not match in number or shape, or no label image holds an object.
    """
    check_pair_count(images, labels)
    if not any(label.any() for label in labels):
        raise ValueError(
            f"None of the {len(labels)} label images contains an object; "
            "annotate some objects or evaluate another split."
        )
    if points_per_side < 1:
        raise ValueError(f"points_per_side must be at least 1, got {points_per_side}.")
    if return_segmentations and not automatic:
        raise ValueError("return_segmentations needs automatic=True: segmentations come from the automatic mode.")

    predictor = SamPredictor(sam)
    box_ious: list[torch.Tensor] = []
    point_ious: list[torch.Tensor] = []
    accuracies: list[tuple[float, float]] = []
    segmentations: list[np.ndarray] = []
    with scoring(sam):
        for done, (image, label) in enumerate(zip(images, labels), start=1):
            check_image_pair(done - 1, image, label)
            set_predictor_image(predictor, image)
            has_objects = bool(label.any())
            if has_objects:
                image_box_ious, image_point_ious = _prompted_ious(predictor, label)
                box_ious.append(image_box_ious)
                point_ious.append(image_point_ious)
            if automatic:
                segmentation = _automatic_segmentation(predictor, image, points_per_side)
                if has_objects:
                    msa, threshold_accuracies = mean_segmentation_accuracy(
                        segmentation, label, return_accuracies=True
                    )
                    # elf's thresholds are np.arange(0.5, 1.0, 0.05): the first one is 0.5.
                    accuracies.append((float(msa), float(threshold_accuracies[0])))
                if return_segmentations:
                    segmentations.append(segmentation)
            if progress is not None:
                progress(done, len(images))

    all_box_ious = torch.cat(box_ious)
    result: dict[str, Any] = {
        "n_images": len(box_ious),
        "n_objects": int(all_box_ious.numel()),
        "box_iou": float(all_box_ious.mean()),
        "point_iou": float(torch.cat(point_ious).mean()),
        "msa": float(np.mean([msa for msa, _ in accuracies])) if automatic else None,
        "sa50": float(np.mean([sa50 for _, sa50 in accuracies])) if automatic else None,
        "amg_points_per_side": points_per_side if automatic else None,
    }
    if return_segmentations:
        result["segmentations"] = segmentations
    return result


def evaluate(
    model_source: str,
    data_path: str | Path,
    split: str = "val",
    *,
    automatic: bool = True,
    device: str = "cpu",
    points_per_side: int = DEFAULT_POINTS_PER_SIDE,
    progress: ProgressCallback | None = None,
) -> EvaluationResult:
    """Score a model on one split of an annotation dataset (Contract 1).

    Args:
        model_source: Anything ``backend.models.load_model`` accepts: a micro-sam zoo name,
            a checkpoint or model folder path, ``random:<model_type>``.
        data_path: The dataset's ``.zarr`` folder.
        split: ``"train"`` or ``"val"``.
        automatic: Whether to also score the automatic segmentation (``msa``, ``sa50``).
        device: Torch device to run the model on, e.g. ``"cpu"`` or ``"cuda"``.
        points_per_side: Side of the automatic mask generator's point grid.
        progress: Called as ``progress(done, total)`` after each image.

    Raises:
        backend.dataset.DatasetError: if the dataset cannot be read or the split holds no objects.
        backend.models.ModelError: if the model cannot be loaded.
    """
    start = time.perf_counter()
    dataset = open_dataset(data_path)
    sample_ids = dataset.require_objects(split)
    loaded = load_model(model_source, device)
    scores = evaluate_images(
        loaded.sam,
        _LazyImages(dataset, sample_ids),
        [dataset.labels(sample_id) for sample_id in sample_ids],
        automatic=automatic,
        points_per_side=points_per_side,
        progress=progress,
    )
    return EvaluationResult(
        model=model_source,
        dataset=str(data_path),
        split=split,
        seconds=time.perf_counter() - start,
        **scores,
    )


class _LazyImages(Sequence[np.ndarray]):
    """The SAM images of some dataset samples, read one at a time so a split need not fit in memory."""

    def __init__(self, dataset: Dataset, sample_ids: Sequence[str]) -> None:
        self._dataset = dataset
        self._sample_ids = sample_ids

    def __len__(self) -> int:
        return len(self._sample_ids)

    def __getitem__(self, index: int) -> np.ndarray:  # type: ignore[override]
        return self._dataset.sam_image(self._sample_ids[index])


def _prompted_ious(predictor: SamPredictor, label: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the ``(N,)`` box-prompt and point-prompt IoUs of the N objects in ``label``."""
    object_ids, boxes, points = object_prompts(label)
    point_labels = torch.ones(points.shape[:2], dtype=torch.int64)
    truth = torch.as_tensor(label.astype(np.int64), device=predictor.device)
    original_size = predictor.original_size

    box_ious, point_ious = [], []
    for start in range(0, len(object_ids), PROMPT_BATCH_SIZE):
        batch = slice(start, start + PROMPT_BATCH_SIZE)
        true_masks = truth[None] == torch.tensor(object_ids[batch], device=truth.device)[:, None, None]

        box_masks, _, _ = predictor.predict_torch(
            None,
            None,
            boxes=predictor.transform.apply_boxes_torch(boxes[batch], original_size).to(predictor.device),
            multimask_output=False,
        )
        box_ious.append(mask_iou(box_masks[:, 0], true_masks))

        point_masks, predicted_ious, _ = predictor.predict_torch(
            predictor.transform.apply_coords_torch(points[batch], original_size).to(predictor.device),
            point_labels[batch].to(predictor.device),
            multimask_output=True,
        )
        best = predicted_ious.argmax(dim=1)
        point_ious.append(mask_iou(point_masks[torch.arange(len(best), device=best.device), best], true_masks))
    return torch.cat(box_ious).cpu(), torch.cat(point_ious).cpu()


def _automatic_segmentation(predictor: SamPredictor, image: np.ndarray, points_per_side: int) -> np.ndarray:
    """Return micro-sam's automatic ``(H, W)`` uint32 instance segmentation of the image set in ``predictor``."""
    generator = AutomaticMaskGenerator(predictor, points_per_side=points_per_side)
    embeddings = {
        "features": predictor.features,
        "input_size": predictor.input_size,
        "original_size": predictor.original_size,
    }
    # The image only gives the generator its size here: the embedding is reused, not recomputed.
    generator.initialize(np.moveaxis(image, 0, -1), image_embeddings=embeddings)
    # output_mode="instance_segmentation" applies micro_sam.util.mask_data_to_segmentation.
    segmentation = generator.generate(output_mode="instance_segmentation")
    return segmentation.astype(np.uint32, copy=False)
