"""Tests of backend.simulated_annotator: clicks with stub predictors whose answers are known, a real tiny SAM."""

from __future__ import annotations

import numpy as np
import pytest
from segment_anything import SamPredictor

from backend.models import build_sam
from backend.object_prompts import object_prompts
from backend.simulated_annotator import (
    MAX_CLICKS,
    ObjectClicks,
    annotate_object,
    click_summary,
    corrective_click,
    simulate_annotator,
)
from synthetic import synthetic_cells


@pytest.fixture(scope="module")
def tiny_sam():
    return build_sam("tiny")


def _cells(seed: int, n_cells: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """A ``(3, 96, 96)`` float32 image in [0, 255] and its ``(96, 96)`` uint32 labels."""
    image, labels = synthetic_cells(np.random.default_rng(seed), n_cells=n_cells)
    return (image / image.max() * 255).astype(np.float32), labels


class StubPredictor(SamPredictor):
    """A SamPredictor (tiny SAM, so images really are set) that answers from the ground truth.

    ``answer`` is ``"truth"`` (the object filling most of the box), ``"box"`` (the filled box,
    whatever the points: it never improves) or ``"left-half"`` (the object's left half until a
    positive point falls in its right half, then the object). Every call is recorded in ``calls``;
    the low-res logits returned are the call's number, so feeding them back shows.
    """

    def __init__(self, sam, label: np.ndarray, answer: str) -> None:
        super().__init__(sam)
        self.label, self.answer = label, answer
        self.calls: list[dict] = []

    def predict(self, point_coords=None, point_labels=None, box=None, mask_input=None,
                multimask_output=True, return_logits=False):
        self.calls.append({"points": point_coords, "labels": point_labels, "box": box, "mask_input": mask_input,
                           "multimask": multimask_output})
        x0, y0, x1, y1 = np.round(box).astype(int)
        in_box = np.zeros(self.label.shape, bool)
        in_box[y0:y1, x0:x1] = True
        counts = np.bincount(self.label[in_box].ravel())
        counts[0] = 0
        truth = self.label == counts.argmax()
        if self.answer == "box":
            mask = in_box
        elif self.answer == "left-half":
            middle = (x0 + x1) / 2
            right_clicked = point_coords is not None and any(
                label == 1 and x >= middle and truth[int(y), int(x)]
                for (x, y), label in zip(point_coords, point_labels)
            )
            mask = truth if right_clicked else truth & (np.arange(truth.shape[1]) < middle)
        else:
            mask = truth
        logits = np.full((1, 256, 256), float(len(self.calls)), np.float32)
        return mask[None], np.ones(1, np.float32), logits


def test_a_perfect_predictor_needs_one_click_per_object(tiny_sam):
    image_a, labels_a = _cells(0)
    predictor = StubPredictor(tiny_sam, labels_a, "truth")
    results = simulate_annotator(predictor, [image_a], [labels_a])
    n_objects = np.unique(labels_a[labels_a > 0]).size

    assert [r.object_id for r in results] == sorted(np.unique(labels_a[labels_a > 0]))
    assert all(r.clicks == 1 and r.iou == 1.0 and r.reached for r in results)
    assert len(predictor.calls) == n_objects  # one decoder pass per object, nothing after
    # The box alone, single-mask output: micro-sam's start_with_box_prompt.
    assert all(c["points"] is None and c["mask_input"] is None and not c["multimask"] for c in predictor.calls)
    assert click_summary(results) == {"n_objects": n_objects, "mean_clicks": 1.0, "reached": 1.0, "mean_iou": 1.0}


@pytest.mark.parametrize("mask_feedback", [False, True])
def test_a_predictor_that_never_improves_uses_every_click(tiny_sam, mask_feedback):
    image, labels = _cells(2, n_cells=1)
    predictor = StubPredictor(tiny_sam, labels, "box")
    [result] = simulate_annotator(predictor, [image], [labels], mask_feedback=mask_feedback)
    truth = labels == result.object_id

    assert result.clicks == MAX_CLICKS and not result.reached
    assert result.iou == pytest.approx(truth.sum() / ((labels > 0).any(0).sum() * (labels > 0).any(1).sum()))
    assert len(predictor.calls) == MAX_CLICKS
    for number, call in enumerate(predictor.calls[1:], start=1):
        # each step: all points so far, all negative (the box's corners are false positives) ...
        assert len(call["points"]) == number and list(call["labels"]) == [0] * number
        assert all(not truth[int(y), int(x)] for x, y in call["points"])
        # ... and, fed back, the logits of the step before as mask_input (the annotator sends none)
        if mask_feedback:
            assert call["mask_input"].shape == (1, 256, 256) and np.all(call["mask_input"] == number)
        else:
            assert call["mask_input"] is None


def test_the_corrective_click_follows_the_error(tiny_sam):
    """The loop clicks positive in the missed half; one click then completes the object."""
    image, labels = _cells(3, n_cells=1)
    predictor = StubPredictor(tiny_sam, labels, "left-half")
    [object_id], boxes, _ = object_prompts(labels)

    ious = annotate_object(predictor, labels == object_id, boxes[0].numpy())

    assert len(ious) == 2 and ious[0] < 0.9 and ious[1] == 1.0
    assert list(predictor.calls[1]["labels"]) == [1]


def test_clicks_to_a_lower_iou_are_read_from_the_same_annotation():
    result = ObjectClicks(image=0, object_id=1, ious=(0.2, 0.6, 0.95), reached=True)
    assert (result.clicks, result.iou) == (3, 0.95)
    assert (result.clicks_to(0.1), result.clicks_to(0.5), result.clicks_to(0.9)) == (1, 2, 3)
    assert result.clicks_to(0.99) == MAX_CLICKS  # never reached: counted as every click


def _square(mask: np.ndarray, row: int, col: int, side: int) -> None:
    mask[row:row + side, col:col + side] = True


def test_the_click_is_the_centre_of_the_largest_connected_error_with_its_polarity():
    truth = np.zeros((60, 80), bool)
    _square(truth, 5, 5, 40)
    predicted = truth.copy()
    predicted[10:19, 20:29] = False  # a 9 x 9 missed hole: 81 pixels, centre (row 14, col 24)
    _square(predicted, 50, 60, 5)  # a 5 x 5 false positive: 25 pixels
    assert corrective_click(predicted, truth) == ((24, 14), 1)

    # Two missed pieces of 25 pixels each (50 in all) lose to one false positive of 49 pixels:
    # the largest *connected* region decides, not the larger kind.
    predicted = truth.copy()
    predicted[10:15, 10:15] = False
    predicted[30:35, 30:35] = False
    _square(predicted, 50, 60, 7)
    assert corrective_click(predicted, truth) == ((63, 53), 0)

    assert corrective_click(truth, truth) is None


def test_progress_counts_every_object_of_every_image_up_to_the_total(tiny_sam):
    (image_a, labels_a), (image_b, labels_b) = _cells(4), _cells(5, n_cells=3)
    total = sum(np.unique(labels[labels > 0]).size for labels in (labels_a, labels_b))
    empty = np.zeros_like(labels_a)
    seen: list[tuple[int, int]] = []

    class TwoImageStub(StubPredictor):
        def set_torch_image(self, transformed_image, original_image_size):
            super().set_torch_image(transformed_image, original_image_size)
            self.label = labels_a if self.label is None else labels_b

    predictor = TwoImageStub(tiny_sam, None, "truth")
    results = simulate_annotator(predictor, [image_a, image_a, image_b], [labels_a, empty, labels_b],
                                 progress=lambda done, of: seen.append((done, of)))

    assert seen == [(done, total) for done in range(1, total + 1)]
    assert [r.image for r in results] == [0] * (total - 3) + [2] * 3  # the empty image is skipped


def test_a_real_tiny_sam_gets_sane_counts_and_keeps_its_training_mode(tiny_sam):
    image, labels = _cells(6, n_cells=3)
    tiny_sam.train()
    results = simulate_annotator(SamPredictor(tiny_sam), [image], [labels], max_clicks=3)

    assert tiny_sam.training
    assert len(results) == np.unique(labels[labels > 0]).size
    assert all(1 <= r.clicks <= 3 and 0 <= r.iou <= 1 and r.reached == (r.iou >= 0.9) for r in results)
    assert all(r.clicks == 3 for r in results if not r.reached)


def test_bad_arguments_are_named(tiny_sam):
    image, labels = _cells(7)
    with pytest.raises(ValueError, match="max_clicks"):
        simulate_annotator(SamPredictor(tiny_sam), [image], [labels], max_clicks=0)
    with pytest.raises(ValueError, match="expected \\(H, W\\)"):
        simulate_annotator(SamPredictor(tiny_sam), [image], [labels[:10]])
