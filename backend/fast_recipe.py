"""The fast decoder-mode recipe: many objects per decoder pass, losses at the decoder's resolution.

With the image encoder frozen, a step should cost a few mask-decoder passes and nothing else.
Per training image this recipe keeps, once: the ``(1, 256, 64, 64)`` embedding and the
instance labels resampled to the decoder's ``256 x 256`` low-resolution logit grid. A step
takes up to ``n_objects`` objects of one image, prompts each with a jittered box or a random
interior point, and runs ONE batched decoder pass for all of them (SAM's decoder repeats the
image embedding per prompt); later prompting rounds add one corrective click per object in the
middle of where the previous prediction is wrong. Each round is backpropagated as soon as it is
computed, so the memory held is that of one round, not of all rounds.

Each object's pass runs over a window of the image tokens around it, plus ``FAR_ROWS`` rows of
tokens drawn from the rest of the image (``backend.windowed_decoder``, which makes the window decode
as the whole image does): the far ones also teach that pixels away from the object are background.
Without them nothing ever did, and after training the whole-image decoder (the annotator's)
spread a box's mask over the whole frame.

Loss, per object: Dice over the decoded pixels plus binary cross-entropy over the loss window
around the object (its box grown by half its size on each side) and the far rows, the object's
pixels and the others weighing half each, plus the IoU head's MSE. Unweighted cross-entropy
over the whole 256 x 256 grid is what collapses a randomly initialised decoder to empty masks:
a HeLa cell covers ~0.2 % of it, so "all background" is a good answer. Point prompts use SAM's
best-of-three multimask loss; box prompts and corrective rounds the single-mask output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from backend import windowed_decoder
from backend.windowed_decoder import (
    INPUT_SIZE, TOKEN, decode, far_tokens, window_origins, window_size, window_with_far_rows, windowed,
)

LOW_RES = 256
"""Side of the decoder's logit grid; SAM's padded input is 1024, so one cell is 4 x 4 input pixels."""
MIN_IMAGES_PER_EPOCH = 18
"""Image steps an epoch trains at least. An epoch ends in validation and a checkpoint, ~0.5 s on 2
CPU cores, the time of ~4 steps: with 6 steps per epoch (the demo's six training frames) a run
spent ~40 % of its minutes there, and on one annotated image, 79 one-step epochs in 5 minutes learned
nothing. With 18, a 2.5-minute run trains twice the steps and ends at val box IoU 0.43 instead of 0.25
(docs/BENCHMARKS.md)."""
VAL_OBJECTS = 64
"""Objects per val image that validation prompts (spread over the image's objects)."""
BOX_JITTER = 0.05
"""Box corners move by up to this fraction of the box's side (annotators draw loose boxes)."""
MARGIN = 0.5
"""The cross-entropy window around an object: its box grown by this fraction of its size per side."""


@dataclass
class PreparedImage:
    """One image as the recipe trains on it (everything on the training device).

    ``embedding``: ``(1, 256, 64, 64)`` float32. ``targets``: ``(N, 256, 256)`` bool masks of
    the N objects on the logit grid (the image resized so its long side is 1024 and padded,
    then sampled every 4 pixels). ``boxes``: ``(N, 4)`` float XYXY in the 1024 input frame
    (exclusive max, as evaluation draws them). ``centres``: ``(N, 2)`` float (x, y) in the
    input frame, the point farthest inside each object (evaluation's single-point prompt).
    """

    embedding: torch.Tensor
    targets: torch.Tensor
    boxes: torch.Tensor
    centres: torch.Tensor

    @property
    def n_objects(self) -> int:
        return len(self.targets)


def prepare_image(embedding: torch.Tensor, labels: np.ndarray, device: torch.device) -> PreparedImage:
    """Resample ``(H, W)`` instance ``labels`` to the logit grid and derive the prompts' geometry.

    Objects that vanish on the 4x coarser grid (under ~4 x 4 pixels) are left out.
    """
    height, width = labels.shape
    scale = INPUT_SIZE / max(height, width)
    # nearest sampling at the centre of each 4 x 4 input cell, mapped back to the original image
    centres_in = (np.arange(LOW_RES) * 4 + 2) / scale
    rows, cols = np.floor(centres_in).astype(int), np.floor(centres_in).astype(int)
    valid_rows, valid_cols = rows < height, cols < width
    grid = np.zeros((LOW_RES, LOW_RES), labels.dtype)
    grid[np.ix_(valid_rows, valid_cols)] = labels[np.ix_(rows[valid_rows], cols[valid_cols])]
    ids = np.array([i for i in np.unique(grid) if i != 0], dtype=labels.dtype)
    slices = ndimage.find_objects(labels)
    boxes, centres = [], []
    for object_id in ids:
        rows_slice, cols_slice = slices[int(object_id) - 1]
        boxes.append([cols_slice.start, rows_slice.start, cols_slice.stop, rows_slice.stop])
        crop = np.pad(labels[rows_slice, cols_slice] == object_id, 1)
        distance = ndimage.distance_transform_edt(crop)
        row, col = np.unravel_index(int(distance.argmax()), distance.shape)
        centres.append([cols_slice.start + col - 1, rows_slice.start + row - 1])
    targets = torch.from_numpy(grid.astype(np.int64))[None] == torch.from_numpy(ids.astype(np.int64))[:, None, None]
    return PreparedImage(
        embedding=embedding.to(device),
        targets=targets.to(device),
        boxes=(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4) * scale).to(device),
        centres=((torch.tensor(centres, dtype=torch.float32).reshape(-1, 2) + 0.5) * scale).to(device),
    )


def _per_object_losses(logits: torch.Tensor, targets: torch.Tensor, windows: torch.Tensor) -> tuple:
    """Dice + windowed BCE of ``(B, M, h, w)`` logits against ``(B, h, w)`` bool targets and windows.

    Returns ``(B, M)`` losses and ``(B, M)`` IoUs of the thresholded masks (no gradient).
    """
    target = targets[:, None].float()
    window = windows[:, None].float()
    probs = torch.sigmoid(logits)
    dice = 1 - (2 * (probs * target).sum((2, 3)) + 1) / (probs.sum((2, 3)) + target.sum((2, 3)) + 1)
    # the object's pixels and the window's other pixels weigh half each: no constant answer is favoured
    positive = target.sum((2, 3), keepdim=True).clamp(min=1)
    negative = ((1 - target) * window).sum((2, 3), keepdim=True).clamp(min=1)
    weights = 0.5 * target / positive + 0.5 * (1 - target) * window / negative
    bce = F.binary_cross_entropy_with_logits(logits, target.expand_as(logits), reduction="none")
    bce = (bce * weights).sum((2, 3))
    with torch.no_grad():
        masks = logits > 0
        inter = (masks & targets[:, None]).sum((2, 3)).float()
        union = (masks | targets[:, None]).sum((2, 3)).float()
        iou = inter / union.clamp(min=1)
    return dice + bce, iou


def _loss_windows(boxes: torch.Tensor) -> torch.Tensor:
    """``(B, 256, 256)`` bool windows: each box (input frame) grown by ``MARGIN`` of its size per side."""
    low = boxes / 4
    size = (low[:, 2:] - low[:, :2]).clamp(min=1)
    start = (low[:, :2] - MARGIN * size).floor()
    stop = (low[:, 2:] + MARGIN * size).ceil()
    grid = torch.arange(LOW_RES, device=boxes.device, dtype=torch.float32)
    in_x = (grid[None] >= start[:, :1]) & (grid[None] < stop[:, :1])
    in_y = (grid[None] >= start[:, 1:]) & (grid[None] < stop[:, 1:])
    return in_y[:, :, None] & in_x[:, None, :]


def _decoded_targets(
    image: PreparedImage, chosen: torch.Tensor, boxes: torch.Tensor, origins: torch.Tensor, far: torch.Tensor, size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``(B, 4 * (size + FAR_ROWS), 4 * size)`` bool targets and cross-entropy windows of
    what ``decode`` returns: each object's window, then its far rows (all in the window)."""
    targets = window_with_far_rows(image.targets[chosen], origins, far, size, 4)
    windows = windowed(_loss_windows(boxes), origins, size, 4)
    far_rows = torch.ones(
        len(windows), 4 * windowed_decoder.FAR_ROWS, windows.shape[-1], dtype=torch.bool, device=windows.device
    )
    return targets, torch.cat([windows, far_rows], dim=1)


def _random_points(masks: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One random pixel of each of ``(B, h, w)`` masks (anywhere when empty), as ``(B, 2)`` (x, y)
    in the window's input-frame pixels (4 per logit)."""
    flat = masks.flatten(1).float()
    weights = torch.where(flat.sum(1, keepdim=True) > 0, flat, torch.ones_like(flat))
    index = torch.multinomial(weights, 1, generator=generator)[:, 0]
    width = masks.shape[-1]
    jitter = torch.rand(len(index), 2, generator=generator, device=masks.device) * 4
    return torch.stack([index % width, index // width], dim=1).float() * 4 + jitter


def _error_centres(errors: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A pixel deepest inside each of ``(B, h, w)`` error masks (chessboard distance to the mask's
    edge, ties drawn at random; anywhere when empty), as ``_random_points`` returns points.

    That is where a person, and ``backend.simulated_annotator``, clicks: in the middle of the
    error, which is in its thickest region, mostly its largest. Trained on random error pixels,
    which lie mostly on a mask's rim, a decoder's corrective clicks helped less (docs/BENCHMARKS.md).
    """
    deepest = errors
    eroded = errors.float()[:, None]
    # the window's edge does not erode (as a distance transform in the annotator's crop), so a mask
    # that is error everywhere never empties; any other is empty after max(h, w) erosions
    for _ in range(max(errors.shape[-2:])):
        eroded = -F.max_pool2d(-eroded, 3, stride=1, padding=1)
        alive = eroded.flatten(1).amax(1) > 0
        if not alive.any():
            break
        deepest = torch.where(alive[:, None, None], eroded[:, 0] > 0, deepest)
    return _random_points(deepest, generator)


def _jittered(boxes: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    size = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2)
    noise = (torch.rand(boxes.shape, generator=generator, device=boxes.device) * 2 - 1) * BOX_JITTER * size
    return (boxes + noise).clamp(0, INPUT_SIZE)


def train_image(
    sam, image: PreparedImage, *, n_objects: int, rounds: int, generator: torch.Generator, loss_scale: float,
    mask_prob: float,
) -> tuple[float, int]:
    """Forward and backward for up to ``n_objects`` objects of one image over ``rounds`` prompting rounds.

    Half the objects start from a jittered box, half from a random interior point; each later
    round adds one click per object in the middle of its error (``_error_centres``; positive
    where the mask misses the object, negative where it spills over) and, with probability
    ``mask_prob``, the previous round's logits as the mask prompt (annotators may feed them back,
    as micro-sam's evaluation does, or not). Gradients accumulate into ``sam``'s parameters,
    scaled by ``loss_scale``; returns (mean loss over rounds, objects used).
    """
    chosen = torch.randperm(image.n_objects, generator=generator, device=generator.device)[:n_objects]
    boxes = image.boxes[chosen]
    size = window_size(boxes)
    origins = window_origins(boxes, size, generator)
    far = far_tokens(origins, size, generator)
    targets, windows = _decoded_targets(image, chosen, boxes, origins, far, size)
    window_side = 4 * size  # clicks go inside the window, not on the far rows below it
    offsets = (origins * TOKEN).float()  # window pixel -> input-frame pixel
    count = len(chosen)
    rows = torch.arange(count, device=targets.device)
    n_box = (count + 1) // 2
    prompt_boxes = _jittered(boxes[:n_box], generator)
    point_coords = [(_random_points(targets[n_box:, :window_side], generator) + offsets[n_box:])[:, None]]
    point_labels = [torch.ones(count - n_box, 1, dtype=torch.int64, device=targets.device)]
    box_coords = torch.zeros(n_box, 0, 2, device=targets.device)
    box_labels = torch.zeros(n_box, 0, dtype=torch.int64, device=targets.device)
    total = 0.0
    mask_prompts = None
    for round_index in range(rounds):
        groups = []
        if n_box:
            groups.append(((box_coords, box_labels) if box_coords.shape[1] else None, prompt_boxes))
        if count > n_box:
            groups.append(((torch.cat(point_coords, 1), torch.cat(point_labels, 1)), None))
        # box starts and point starts encode to the same number of tokens in every round
        # (box: 2 corners + clicks; points: start + clicks + SAM's padding token), so one pass serves both
        logits, iou_pred = decode(sam, image.embedding, origins, far, size, groups, mask_prompts)
        losses, ious = _per_object_losses(logits, targets, windows)
        picked = torch.zeros(count, dtype=torch.int64, device=logits.device)
        if round_index == 0 and count > n_box:
            # a single point is ambiguous: the best of the three multimask outputs is trained (SAM's rule)
            picked[n_box:] = losses[n_box:, 1:].argmin(1) + 1
        loss = losses[rows, picked].mean() + F.mse_loss(iou_pred[rows, picked], ious[rows, picked])
        (loss * loss_scale / rounds).backward()
        total += float(loss.detach())
        if round_index + 1 < rounds:
            errors = ((logits.detach()[rows, picked] > 0) ^ targets)[:, :window_side]
            local = _error_centres(errors, generator)
            cell = (local / 4).long().clamp(0, window_side - 1)
            positive = targets[rows, cell[:, 1], cell[:, 0]].long()
            clicks = local + offsets
            box_coords = torch.cat([box_coords, clicks[:n_box, None]], 1)
            box_labels = torch.cat([box_labels, positive[:n_box, None]], 1)
            point_coords.append(clicks[n_box:, None])
            point_labels.append(positive[n_box:, None])
            used = torch.rand(count, generator=generator, device=logits.device) < mask_prob
            mask_prompts = (logits.detach()[rows, picked], used)
    return total / rounds, count


@torch.no_grad()
def validate_image(sam, image: PreparedImage) -> tuple[float, float, float, int]:
    """Box and single-point prompts, as evaluation draws them, for up to ``VAL_OBJECTS`` objects.

    Windows are centred on each object, with the same far-away tokens each time (a fixed
    seed), so a mask that spills away from its object counts against it. Returns (summed loss,
    summed box IoU, summed point IoU, objects) on the logit grid; a point's mask is the one with
    the highest predicted IoU.
    """
    total_loss = box_sum = point_sum = 0.0
    count = 0
    generator = torch.Generator(image.boxes.device).manual_seed(0)
    chosen = torch.linspace(0, image.n_objects - 1, min(image.n_objects, VAL_OBJECTS)).round().long()
    for part in chosen.to(image.boxes.device).split(32):
        boxes = image.boxes[part]
        size = window_size(boxes)
        origins = window_origins(boxes, size, None)
        far = far_tokens(origins, size, generator)
        targets, windows = _decoded_targets(image, part, boxes, origins, far, size)
        box_logits, _ = decode(sam, image.embedding, origins, far, size, [(None, boxes)])
        box_losses, box_ious = _per_object_losses(box_logits[:, :1], targets, windows)
        ones = torch.ones(len(part), 1, dtype=torch.int64, device=boxes.device)
        point_logits, point_pred = decode(
            sam, image.embedding, origins, far, size, [((image.centres[part][:, None], ones), None)]
        )
        point_losses, point_ious = _per_object_losses(point_logits[:, 1:], targets, windows)
        best = point_pred[:, 1:].argmax(1)
        rows = torch.arange(len(part), device=boxes.device)
        total_loss += float(box_losses.sum() + point_losses[rows, best].sum()) / 2
        box_sum += float(box_ious.sum())
        point_sum += float(point_ious[rows, best].sum())
        count += len(part)
    return total_loss, box_sum, point_sum, count


def epoch_order(n_images: int, images_per_epoch: int, seed: int) -> Iterator[int]:
    """Indices of the images one epoch visits: whole shuffled passes, ``images_per_epoch`` in all."""
    rng = np.random.default_rng(seed)
    passes = math.ceil(images_per_epoch / n_images)
    order = np.concatenate([rng.permutation(n_images) for _ in range(passes)])[:images_per_epoch]
    return iter(order.tolist())
