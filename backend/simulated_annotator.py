"""A simulated annotator: how many clicks a SAM model needs per object (issue 8's human-in-the-loop gain).

Each ground-truth object is annotated on its own, as a person does one object at a time:

1. click 1 is the object's box (XYXY, exclusive max: ``backend.object_prompts.object_prompts``,
   the box of ``backend.evaluation``), single-mask output;
2. while the mask's IoU with the object is below ``target_iou`` and fewer than ``max_clicks``
   clicks were given, one corrective point: at the point farthest inside the largest
   8-connected error region of the current mask, positive where that region is a missed part
   of the object, negative where it is a false positive. Each prediction gets the box and all
   points so far, single-mask output, as the annotator's Segment sends them (micro-sam's
   ``segment_from_box_and_points``, which passes no mask prompt). With ``mask_feedback`` it
   also gets the previous prediction's ``(1, 256, 256)`` low-res logits as ``mask_input``
   (micro-sam's evaluation with ``use_masks=True``).

So ``clicks`` counts prompts: the box is 1, each corrective point adds 1, at most ``max_clicks``
(8 clicks = the box and 7 points = 8 decoder passes, as micro-sam's 8 iterations).

How this differs from micro-sam's iterative prompting
(``micro_sam.evaluation.inference.run_inference_with_iterative_prompting`` with
``micro_sam.prompt_generators.IterativePromptGenerator``), which it follows in starting from the
box, single-mask output and keeping every earlier prompt (its default ``use_masks=False``
feeds no logits back either): micro-sam adds per iteration one positive *and* one negative point, each
drawn at random from *all* missed / false-positive pixels, and runs a fixed number of iterations
for every object. Here each step is one deterministic click where a person would click (the
centre of the largest error, the click protocol of interactive-segmentation benchmarks), and an
object stops once it reaches ``target_iou``, since the number of clicks is the figure. The
centre is micro-sam's own (``get_centers_and_bounding_boxes``, ``mode="v"``) of that region.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from micro_sam.util import get_centers_and_bounding_boxes
from scipy.ndimage import find_objects
from segment_anything import SamPredictor
from skimage.measure import label as connected_components

from backend.models import set_predictor_image
from backend.object_prompts import check_image_pair, check_pair_count, mask_iou, object_prompts, scoring

TARGET_IOU = 0.9
MAX_CLICKS = 8

ProgressCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class ObjectClicks:
    """The simulated annotation of one object.

    ``clicks``: prompts given, the box counting as the first (1 to ``max_clicks``); ``ious``: the
    mask's IoU with the object after each click (``clicks`` of them); ``reached``: whether the last
    IoU is ``>= target_iou`` (when False, ``clicks == max_clicks``).
    """

    image: int
    """Index of the object's image in the input."""
    object_id: int
    ious: tuple[float, ...]
    reached: bool

    @property
    def clicks(self) -> int:
        return len(self.ious)

    @property
    def iou(self) -> float:
        """The IoU of the last mask."""
        return self.ious[-1]

    def clicks_to(self, iou: float, max_clicks: int = MAX_CLICKS) -> int:
        """Clicks this object took to reach ``iou`` (at most the target it ran to); ``max_clicks`` when
        it never did."""
        return next((click for click, after in enumerate(self.ious, 1) if after >= iou), max_clicks)


def corrective_click(predicted: np.ndarray, truth: np.ndarray) -> tuple[tuple[int, int], int] | None:
    """The next click for ``(H, W)`` bool masks ``predicted`` (the model's) and ``truth`` (the object's).

    Returns ``((x, y), label)`` in pixels with SAM's point labels (1 positive, 0 negative): the
    point farthest inside the largest 8-connected region of missed object pixels (positive) or
    false-positive pixels (negative); ties go to the region that comes first in raster order.
    None when the masks are equal.
    """
    # 1 = missed part of the object, 2 = false positive; labelling keeps the two kinds apart
    # even where they touch, so a region has one polarity.
    error = (truth & ~predicted).astype(np.uint8) + 2 * (predicted & ~truth).astype(np.uint8)
    components = connected_components(error, background=0, connectivity=2)
    if components.max() == 0:
        return None
    largest = int(np.argmax(np.bincount(components.ravel())[1:])) + 1
    rows, cols = find_objects(components, max_label=largest)[largest - 1]
    # micro-sam's centre of the region alone, in its bounding box (pixels outside it are not the region).
    centers, _ = get_centers_and_bounding_boxes((components[rows, cols] == largest).astype(np.uint8))
    row, col = centers[1][0] + rows.start, centers[1][1] + cols.start
    return (col, row), 1 if error[row, col] == 1 else 0


def annotate_object(
    predictor: SamPredictor,
    truth: np.ndarray,
    box: np.ndarray,
    *,
    target_iou: float = TARGET_IOU,
    max_clicks: int = MAX_CLICKS,
    mask_feedback: bool = False,
) -> list[float]:
    """Annotate one object on the image already set in ``predictor``; returns the IoU after each click.

    ``truth`` is the object's ``(H, W)`` bool mask, ``box`` its ``(4,)`` XYXY box in pixels
    (exclusive max); ``mask_feedback``: each prediction after the first also gets the previous
    one's logits as ``mask_input``. Runs under the caller's grad mode and model mode (see
    ``simulate_annotator``).
    """
    points: list[tuple[int, int]] = []
    point_labels: list[int] = []
    logits = None
    true_mask = torch.from_numpy(truth[None])
    ious = []
    for clicks in range(1, max_clicks + 1):
        masks, _, logits = predictor.predict(
            point_coords=np.array(points, np.float32) if points else None,
            point_labels=np.array(point_labels, np.int64) if points else None,
            box=box,
            mask_input=logits if mask_feedback else None,
            multimask_output=False,
        )
        iou = float(mask_iou(torch.from_numpy(masks), true_mask)[0])
        ious.append(iou)
        if iou >= target_iou or clicks == max_clicks:
            break
        # IoU < target_iou <= 1, so the masks differ and there is a click.
        (x, y), polarity = corrective_click(masks[0], truth)  # type: ignore[misc]
        points.append((x, y))
        point_labels.append(polarity)
    return ious


def simulate_annotator(
    predictor: SamPredictor,
    images: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    *,
    target_iou: float = TARGET_IOU,
    max_clicks: int = MAX_CLICKS,
    mask_feedback: bool = False,
    progress: ProgressCallback | None = None,
) -> list[ObjectClicks]:
    """Annotate every object of every image with the simulated annotator (module docstring).

    Args:
        predictor: A ``segment_anything.SamPredictor`` of the model (any SAM, e.g. ``mobile_sam``'s
            ``vit_t``); its model is run in eval mode without gradients, and its training mode is
            restored afterwards. Each image is embedded into it with ``set_predictor_image``.
        images: Per image a ``(3, H, W)`` float array in SAM's RGB range ``[0, 255]``.
        labels: Per image the ``(H, W)`` uint32 instance ids (0 = background); every object is
            annotated, so pass a subset of the ids to annotate fewer.
        target_iou: An object is done at this IoU, in ``(0, 1]``.
        max_clicks: The most clicks per object (the box included), at least 1.
        mask_feedback: Feed each prediction's low-res logits back as the next one's mask prompt
            (micro-sam's ``use_masks=True``); False, as the annotator segments.
        progress: Called as ``progress(done, total)`` after each object; ``total`` is the number of
            objects in all images.

    Returns:
        One ``ObjectClicks`` per object, in image order, then ascending object id.

    Raises:
        ValueError: if the inputs do not match in number or shape, or the limits are out of range.
    """
    check_pair_count(images, labels)
    if not 0 < target_iou <= 1:
        raise ValueError(f"target_iou must be in (0, 1], got {target_iou}.")
    if max_clicks < 1:
        raise ValueError(f"max_clicks must be at least 1 (the box), got {max_clicks}.")
    for index, (image, label) in enumerate(zip(images, labels)):
        check_image_pair(index, image, label)
    total = sum(np.unique(label[label > 0]).size for label in labels)

    results: list[ObjectClicks] = []
    with scoring(predictor.model):
        for index, (image, label) in enumerate(zip(images, labels)):
            if not label.any():
                continue  # no object: nothing to embed the image for
            set_predictor_image(predictor, image)
            object_ids, boxes, _ = object_prompts(label)
            for object_id, box in zip(object_ids, boxes.numpy()):
                ious = annotate_object(
                    predictor, label == object_id, box, target_iou=target_iou, max_clicks=max_clicks,
                    mask_feedback=mask_feedback,
                )
                results.append(ObjectClicks(index, object_id, tuple(ious), ious[-1] >= target_iou))
                if progress is not None:
                    progress(len(results), total)
    return results


def click_summary(results: Sequence[ObjectClicks]) -> dict[str, float]:
    """``{"n_objects", "mean_clicks", "reached", "mean_iou"}``: ``reached`` is the share of objects at the target."""
    if not results:
        raise ValueError("No objects were annotated; there is nothing to summarise.")
    return {
        "n_objects": len(results),
        "mean_clicks": float(np.mean([r.clicks for r in results])),
        "reached": float(np.mean([r.reached for r in results])),
        "mean_iou": float(np.mean([r.iou for r in results])),
    }
