"""How unsure a SAM model is about an image: the confidence of its masks for a grid of point prompts.

"What to annotate next" (active learning): the image whose objects the current model is least
sure of is the one a round of fine-tuning learns most from. Without ground truth, SAM says how
sure it is in two ways its automatic mask generator filters masks by: the predicted IoU of each
mask (the IoU head) and the mask's *stability*, the IoU of the mask thresholded at logit -1 and
at +1 (segment-anything's ``calculate_stability_score``, offset 1): a mask whose outline moves as
the threshold moves is one the model is unsure where to draw. Each point of an evenly spaced
grid is one prompt, as in automatic mask generation; of its three multimask outputs the one with
the highest predicted IoU is kept (as SAM's single-answer choice), and the point's confidence is
``clip(predicted IoU, 0, 1) x stability``. The image's uncertainty is one minus the mean over
its points, in [0, 1].

Only the image embedding and the mask decoder are used, so the embedding may come from any cache,
and the whole-image decoder, as the annotator segments with it: on 2 CPU cores about 6 s for the
default 8 x 8 grid (a point costs ~0.1 s: SAM's decoder repeats all 64 x 64 image tokens per
prompt), milliseconds on a GPU. The logits are scored at the decoder's low resolution (4 x 4
input pixels per logit), over the image, not SAM's padding.
"""

from __future__ import annotations

import numpy as np
import torch
from segment_anything import SamPredictor
from segment_anything.utils.amg import build_point_grid

from backend.object_prompts import scoring

POINTS_PER_SIDE = 8
BATCH_SIZE = 64
STABILITY_OFFSET = 1.0  # segment-anything's default for its automatic mask generator


def point_confidences(
    predictor: SamPredictor, points_per_side: int = POINTS_PER_SIDE, batch_size: int = BATCH_SIZE
) -> np.ndarray:
    """Confidence in [0, 1] of the model's mask for each point of a grid over the predictor's image.

    Args:
        predictor: a ``SamPredictor`` whose image is set (``set_image``, or micro-sam's
            ``set_precomputed`` with cached embeddings); only its features and sizes are read.
        points_per_side: the grid has ``points_per_side ** 2`` points, evenly spaced as in
            segment-anything's automatic mask generator.
        batch_size: points per decoder pass.

    Returns:
        ``(points_per_side ** 2,)`` float64: per point, its best mask's ``clip(predicted IoU, 0, 1)``
        times that mask's stability score.
    """
    if not predictor.is_image_set:
        raise ValueError("the predictor has no image: set one (set_image or micro-sam's set_precomputed) first")
    sam = predictor.model
    height, width = predictor.original_size
    grid = build_point_grid(points_per_side) * np.array([width, height])  # (N, 2) x, y in pixels
    coords = torch.as_tensor(predictor.transform.apply_coords(grid, (height, width)), dtype=torch.float32)
    coords = coords.to(predictor.device)
    # the logits cover SAM's padded 1024 frame at a quarter of its resolution; the image is its top left
    rows, cols = (-(-side * 256 // sam.image_encoder.img_size) for side in predictor.input_size)
    confidences = []
    with scoring(sam):
        dense_pe = sam.prompt_encoder.get_dense_pe()
        for points in coords.split(batch_size):
            labels = torch.ones(len(points), 1, dtype=torch.int, device=points.device)
            sparse, dense = sam.prompt_encoder(points=(points[:, None], labels), boxes=None, masks=None)
            logits, predicted_iou = sam.mask_decoder(
                image_embeddings=predictor.features,
                image_pe=dense_pe,
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=True,
            )
            best = predicted_iou.argmax(dim=1)
            each = torch.arange(len(best), device=best.device)
            chosen = logits[each, best, :rows, :cols]
            high = (chosen > sam.mask_threshold + STABILITY_OFFSET).sum(dim=(1, 2))
            low = (chosen > sam.mask_threshold - STABILITY_OFFSET).sum(dim=(1, 2))
            # segment-anything's calculate_stability_score; a mask empty even at the low threshold
            # has neither an object nor an outline: confidence 0
            stability = torch.where(low > 0, high / low.clamp(min=1), torch.zeros(len(best), device=best.device))
            confidences.append((predicted_iou[each, best].clamp(0, 1) * stability).double().cpu())
    return torch.cat(confidences).numpy()


def uncertainty(confidences: np.ndarray) -> float:
    """One minus the mean of ``confidences`` (:func:`point_confidences`, of one image or of all its
    tiles together): 0 = sure of every mask, 1 = sure of none."""
    confidences = np.asarray(confidences, dtype=np.float64)
    if confidences.size == 0:
        raise ValueError("no point confidences to score: give at least one grid point")
    return float(1.0 - confidences.mean())
