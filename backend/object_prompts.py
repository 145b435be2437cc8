"""The prompts micro-sam derives from ground-truth objects, and the checks, model mode and IoU around them.

Shared by ``backend.evaluation`` (box and point IoU) and ``backend.simulated_annotator``
(clicks per object), so both prompt and score an object the same way.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from micro_sam.util import get_centers_and_bounding_boxes
from segment_anything.modeling import Sam


def check_pair_count(images: Sequence[np.ndarray], labels: Sequence[np.ndarray]) -> None:
    """Raise ValueError unless there is one label image per image."""
    if len(images) != len(labels):
        raise ValueError(f"Got {len(images)} images but {len(labels)} label images; pass one label image per image.")


def check_image_pair(index: int, image: np.ndarray, label: np.ndarray) -> None:
    """Raise ValueError unless ``image`` is ``(3, H, W)`` and ``label`` is ``(H, W)``; ``index`` names the pair."""
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"Image {index} has shape {image.shape}; expected (3, H, W) channel-first RGB in [0, 255].")
    if label.shape != image.shape[1:]:
        raise ValueError(f"Labels {index} have shape {label.shape}; expected (H, W) = {image.shape[1:]}.")


@contextlib.contextmanager
def scoring(sam: Sam) -> Iterator[None]:
    """Run ``sam`` in eval mode without autograd; its training mode is restored afterwards."""
    was_training = sam.training
    sam.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        sam.train(was_training)


def object_prompts(label: np.ndarray) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """The objects of an ``(H, W)`` label image (0 = background) and micro-sam's prompts for them.

    Returns the N object ids in ascending order, their ``(N, 4)`` float32 boxes (XYXY in pixels,
    exclusive max, as ``micro_sam.util.get_centers_and_bounding_boxes`` and micro-sam's evaluation
    derive them) and ``(N, 1, 2)`` float32 points (x, y): each object's point farthest inside it
    (micro-sam's ``mode="v"`` centre).
    """
    centers, bboxes = get_centers_and_bounding_boxes(label)
    object_ids = sorted(bboxes)
    # skimage bboxes are (min_row, min_col, max_row, max_col); SAM wants XYXY, same exclusive max.
    boxes = torch.tensor([[b[1], b[0], b[3], b[2]] for b in map(bboxes.get, object_ids)], dtype=torch.float32)
    # Centres are (row, col); SAM points are (x, y).
    points = torch.tensor([[centers[i][::-1]] for i in object_ids], dtype=torch.float32)
    return object_ids, boxes, points


def mask_iou(predicted: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """``(N,)`` float64 IoU of ``(N, H, W)`` bool masks, pairwise along N; ``true`` masks are never empty."""
    intersection = (predicted & true).sum(dim=(1, 2))
    union = (predicted | true).sum(dim=(1, 2))
    return intersection.double() / union.double()
