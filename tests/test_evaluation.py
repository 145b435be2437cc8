"""Tests of backend.evaluation: metric plumbing with oracle predictors, a real random SAM, the dataset glue."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from segment_anything import SamPredictor

from backend import evaluation
from backend.dataset import DatasetError, SampleInput, write_samples
from backend.evaluation import EvaluationResult, evaluate, evaluate_images
from backend.models import build_sam

# Non-square on purpose: swapped x/y in a prompt lands on another region and shows in the IoU.
HEIGHT, WIDTH = 112, 176


def _scene(objects: list[tuple[str, tuple[int, int, int, int]]]) -> tuple[np.ndarray, np.ndarray]:
    """A ``(3, H, W)`` float32 image in [0, 255] and its ``(H, W)`` uint32 labels.

    Each object is ``("disk", (row, col, radius, _))`` or ``("rect", (row0, col0, row1, col1))``
    (exclusive ends); ids are 1, 2, ... in order.
    """
    labels = np.zeros((HEIGHT, WIDTH), np.uint32)
    rows, cols = np.mgrid[:HEIGHT, :WIDTH]
    for object_id, (shape, (a, b, c, d)) in enumerate(objects, start=1):
        if shape == "disk":
            labels[(rows - a) ** 2 + (cols - b) ** 2 <= c**2] = object_id
        else:
            labels[a:c, b:d] = object_id
    image = np.stack([np.where(labels > 0, 200.0, 30.0)] * 3).astype(np.float32)
    return image, labels


ONE_OBJECT = [("disk", (30, 40, 14, 0))]
THREE_OBJECTS = [("rect", (10, 100, 30, 140)), ("disk", (75, 35, 15, 0)), ("disk", (80, 130, 13, 0))]
# Rectangles that keep an IoU between 0.70 and 0.75 with themselves shifted by (2, 2).
THREE_RECTANGLES = [("rect", (10, 100, 30, 140)), ("rect", (60, 20, 82, 50)), ("rect", (70, 120, 94, 150))]


@pytest.fixture(scope="module")
def tiny_sam():
    return build_sam("tiny")


def _oracle_predictor(label_images: list[np.ndarray], answers: list[str]) -> type[SamPredictor]:
    """A SamPredictor class that ignores the model's masks and answers from the ground truth.

    For image ``i`` (counted by ``set_torch_image`` calls) ``answers[i]`` is ``"truth"``, the
    labelled region under the prompt (for a box: the object filling most of it; for a point:
    the region it hits, background included), ``"shifted"``, that region moved 2 pixels right
    and down, or ``"empty"``, no pixels. Multimask output puts that answer second, between two
    empty masks, with the highest predicted IoU. Prompts are recorded in image coordinates
    (boxes XYXY, points XY) in ``boxes_seen`` / ``points_seen``.
    """

    class OraclePredictor(SamPredictor):
        images_set = 0
        boxes_seen: list[list[float]] = []
        points_seen: list[list[float]] = []

        def set_torch_image(self, transformed_image, original_image_size):
            super().set_torch_image(transformed_image, original_image_size)
            index = type(self).images_set
            self.truth = torch.as_tensor(label_images[index].astype(np.int64))
            self.answer = answers[index]
            type(self).images_set += 1

        def predict_torch(self, point_coords, point_labels, boxes=None, mask_input=None,
                          multimask_output=True, return_logits=False):
            # Undo ResizeLongestSide: prompts arrive in the frame of the resized (input_size) image.
            scale = torch.tensor(self.original_size[::-1], dtype=torch.float32) / torch.tensor(
                self.input_size[::-1], dtype=torch.float32
            )
            if boxes is not None:
                boxes = boxes.cpu() * scale.repeat(2)
                type(self).boxes_seen += boxes.tolist()
                regions = torch.stack([self._region_in_box(box) for box in boxes])
            else:
                points = point_coords[:, 0].cpu() * scale
                type(self).points_seen += points.tolist()
                x, y = points.round().long().unbind(dim=1)
                regions = self.truth[None] == self.truth[y, x][:, None, None]
            if self.answer == "shifted":
                regions = regions.roll(shifts=(2, 2), dims=(1, 2))
            elif self.answer == "empty":
                regions = torch.zeros_like(regions)
            if multimask_output:
                empty = torch.zeros_like(regions)
                masks = torch.stack([empty, regions, empty], dim=1)
                ious = torch.tensor([[0.3, 0.9, 0.6]]).repeat(len(regions), 1)
            else:
                masks, ious = regions[:, None], torch.ones(len(regions), 1)
            logits = torch.where(masks, 10.0, -10.0)
            low_res = torch.zeros(masks.shape[:2] + (256, 256))
            return (logits if return_logits else logits > self.model.mask_threshold), ious, low_res

        def _region_in_box(self, box: torch.Tensor) -> torch.Tensor:
            x0, y0, x1, y1 = box.round().long().tolist()
            counts = torch.bincount(self.truth[y0:y1, x0:x1].flatten())
            counts[0] = 0
            return self.truth == counts.argmax() if counts.sum() > 0 else torch.zeros_like(self.truth, dtype=bool)

    return OraclePredictor


def test_ground_truth_answers_score_one_and_prompts_follow_micro_sam(tiny_sam, monkeypatch):
    image, labels = _scene(THREE_OBJECTS)
    oracle = _oracle_predictor([labels], ["truth"])
    monkeypatch.setattr(evaluation, "SamPredictor", oracle)

    scores = evaluate_images(tiny_sam, [image], [labels], points_per_side=8)

    assert scores["box_iou"] == 1.0
    assert scores["point_iou"] == 1.0  # needs the mask of highest predicted IoU, not the first
    # The real AutomaticMaskGenerator ran on the oracle's masks: the background region is
    # dropped as the largest object and the three cells are found exactly.
    assert scores["msa"] == 1.0
    assert scores["sa50"] == 1.0
    assert scores["amg_points_per_side"] == 8
    assert oracle.images_set == 1  # one embedding, reused by every prompt
    # Boxes: tight XYXY with exclusive max (regionprops' bbox, micro-sam's convention).
    assert np.allclose(oracle.boxes_seen, [[100, 10, 140, 30], [20, 60, 51, 91], [117, 67, 144, 94]], atol=1e-3)
    # Points, as (x, y): the pixel farthest inside each object. For a disk that is its centre;
    # the 20 x 40 rectangle has a plateau 9 pixels deep and the first of it (row-major) is used.
    # The automatic generator's grid points come after these three.
    assert np.allclose(oracle.points_seen[:3], [[109, 19], [35, 75], [130, 80]], atol=1e-3)


def test_empty_answers_score_zero(tiny_sam, monkeypatch):
    image, labels = _scene(THREE_OBJECTS)
    monkeypatch.setattr(evaluation, "SamPredictor", _oracle_predictor([labels], ["empty"]))

    scores = evaluate_images(tiny_sam, [image], [labels], points_per_side=4)

    assert (scores["box_iou"], scores["point_iou"]) == (0.0, 0.0)
    assert (scores["msa"], scores["sa50"]) == (0.0, 0.0)


def test_shifted_answers_score_their_iou_and_sa50_uses_the_lowest_threshold(tiny_sam, monkeypatch):
    image, labels = _scene(THREE_RECTANGLES)
    monkeypatch.setattr(evaluation, "SamPredictor", _oracle_predictor([labels], ["shifted"]))
    objects = [labels == object_id for object_id in (1, 2, 3)]
    shifted = [np.roll(mask, (2, 2), axis=(0, 1)) for mask in objects]
    object_ious = [(a & b).sum() / (a | b).sum() for a, b in zip(objects, shifted)]
    assert all(0.70 < iou < 0.75 for iou in object_ious)

    scores = evaluate_images(tiny_sam, [image], [labels], points_per_side=8)

    assert scores["box_iou"] == pytest.approx(np.mean(object_ious))
    assert scores["point_iou"] == pytest.approx(np.mean(object_ious))
    # Every object is matched at the IoU thresholds 0.5 to 0.7 and at none of 0.75 to 0.95.
    assert scores["sa50"] == 1.0
    assert scores["msa"] == pytest.approx(0.5)


def test_ious_are_pooled_over_objects_and_empty_images_skipped(tiny_sam, monkeypatch):
    one, one_labels = _scene(ONE_OBJECT)
    blank, blank_labels = _scene([])
    three, three_labels = _scene(THREE_OBJECTS)
    label_images = [one_labels, blank_labels, three_labels]
    monkeypatch.setattr(evaluation, "SamPredictor", _oracle_predictor(label_images, ["truth", "truth", "empty"]))
    calls = []

    scores = evaluate_images(
        tiny_sam, [one, blank, three], label_images, automatic=False, progress=lambda *call: calls.append(call)
    )

    assert scores["n_images"] == 2
    assert scores["n_objects"] == 4
    # 1 object right, 3 wrong: 1/4 pooled over objects (a mean of per-image means would be 1/2).
    assert scores["box_iou"] == pytest.approx(0.25)
    assert scores["point_iou"] == pytest.approx(0.25)
    assert scores["msa"] is None and scores["sa50"] is None and scores["amg_points_per_side"] is None
    assert calls == [(1, 3), (2, 3), (3, 3)]


def test_random_vit_t_gives_scores_in_unit_range():
    sam = build_sam("vit_t")
    image, labels = _scene(THREE_OBJECTS)

    scores = evaluate_images(sam, [image], [labels], points_per_side=2, return_segmentations=True)

    for key in ("box_iou", "point_iou", "msa", "sa50"):
        assert math.isfinite(scores[key]) and 0.0 <= scores[key] <= 1.0, (key, scores[key])
    (segmentation,) = scores["segmentations"]
    assert segmentation.shape == labels.shape and segmentation.dtype == np.uint32
    assert sam.training is False


@pytest.mark.parametrize(
    ("images", "labels", "message"),
    [
        ([np.zeros((3, 8, 8), np.float32)], [], "1 images but 0 label images"),
        ([np.zeros((8, 8, 3), np.float32)], [np.ones((8, 8), np.uint32)], r"expected \(3, H, W\)"),
        ([np.zeros((3, 8, 8), np.float32)], [np.ones((8, 9), np.uint32)], r"expected \(H, W\) = \(8, 8\)"),
        ([np.zeros((3, 8, 8), np.float32)], [np.zeros((8, 8), np.uint32)], "contains an object"),
    ],
)
def test_bad_inputs_are_refused_with_the_fix(tiny_sam, images, labels, message):
    with pytest.raises(ValueError, match=message):
        evaluate_images(tiny_sam, images, labels)


def test_evaluate_scores_the_val_split_of_a_dataset(tmp_path):
    path = tmp_path / "cells.zarr"
    samples = []
    for objects, split in ((ONE_OBJECT, "val"), ([], "train"), (THREE_OBJECTS, "val")):
        image, labels = _scene(objects)
        samples.append(SampleInput(image=image.astype(np.uint16), labels=labels, split=split))
    write_samples(path, samples)
    calls = []

    result = evaluate("random:tiny", path, "val", points_per_side=2, progress=lambda *call: calls.append(call))

    assert isinstance(result, EvaluationResult)
    assert (result.model, result.dataset, result.split) == ("random:tiny", str(path), "val")
    assert (result.n_images, result.n_objects, result.amg_points_per_side) == (2, 4, 2)
    assert result.seconds > 0
    assert calls == [(1, 2), (2, 2)]
    as_json = json.loads(json.dumps(result.to_dict()))
    assert as_json == result.to_dict()
    for key in ("box_iou", "point_iou", "msa", "sa50"):
        assert 0.0 <= as_json[key] <= 1.0
    # The train image has no objects: there is nothing to evaluate there.
    with pytest.raises(DatasetError, match="no annotated objects"):
        evaluate("random:tiny", path, "train")
