"""Exporting the annotator's images (Qt-free core): each image exactly once, splits, embeddings."""

from __future__ import annotations

import numpy as np
import pytest

from backend.dataset import DatasetError, open_dataset
from napari_raysam.annotator.annotations import AnnotationStore
from napari_raysam.annotator.export import AnnotatedImage, EmbeddingSource, export_annotations
from napari_raysam.annotator.image_source import (
    ImageChannels,
    ImageError,
    content_key,
    sam_channels_choice,
    sam_rgb,
    stack_index,
)
from napari_raysam.annotator.prompts import NEGATIVE, POSITIVE, PromptError, object_prompts, prompts_from_layers
from napari_raysam.annotator.session import embedding_cache_path
from synthetic import synthetic_cells


def annotated_stack(tmp_path, n: int, annotate=range) -> tuple[AnnotatedImage, AnnotationStore, np.ndarray]:
    """A (n, 96, 96) single-channel stack; the slices in ``annotate(n)`` carry autosaved objects."""
    rng = np.random.default_rng(0)
    pairs = [synthetic_cells(rng, n_channels=1, n_cells=4) for _ in range(n)]
    stack = np.stack([image[0] for image, _ in pairs])
    channels = ImageChannels.from_layer(stack, rgb=False, channel_axis=None, name="cells")
    store = AnnotationStore(tmp_path / "cache")
    for z in annotate(n):
        store.save(content_key(channels.plane((z,))), pairs[z][1])
    return AnnotatedImage(channels, "cells", (0,)), store, np.stack([labels for _, labels in pairs])


def test_a_fine_tune_export_sends_a_fifth_to_validation_and_each_image_once(tmp_path):
    image, store, _ = annotated_stack(tmp_path, 10)
    result = export_annotations([image], tmp_path / "d.zarr", store)
    assert (result.added, result.replaced, result.unchanged) == (10, 0, 0)
    assert (result.train, result.val) == (8, 2)

    again = export_annotations([image, image], tmp_path / "d.zarr", store)  # listed twice: still once
    assert (again.added, again.replaced, again.unchanged) == (0, 0, 10)
    assert len(open_dataset(tmp_path / "d.zarr").sample_ids()) == 10


def test_changed_objects_replace_the_stored_image_in_its_split(tmp_path):
    image, store, labels = annotated_stack(tmp_path, 3)
    export_annotations([image], tmp_path / "d.zarr", store)
    before = open_dataset(tmp_path / "d.zarr")
    splits = {before.image_sha256(s): before.split(s) for s in before.sample_ids()}
    key = content_key(image.channels.plane((1,)))
    changed = labels[1].copy()
    changed[:10, :10] = 99
    store.save(key, changed)

    result = export_annotations([image], tmp_path / "d.zarr", store)
    assert (result.added, result.replaced, result.unchanged) == (0, 1, 2)
    after = open_dataset(tmp_path / "d.zarr")
    assert len(after.sample_ids()) == 3
    (sample,) = [s for s in after.sample_ids() if after.image_sha256(s) == key]
    assert after.split(sample) == splits[key]
    np.testing.assert_array_equal(after.labels(sample), changed)


def test_switching_the_split_moves_images_without_duplicates(tmp_path):
    image, store, _ = annotated_stack(tmp_path, 2)
    export_annotations([image], tmp_path / "d.zarr", store, split="train")
    result = export_annotations([image], tmp_path / "d.zarr", store, split="val")
    assert (result.replaced, result.train, result.val) == (2, 0, 2)
    dataset = open_dataset(tmp_path / "d.zarr")
    assert dataset.sample_ids("train") == [] and len(dataset.sample_ids("val")) == 2


def test_unannotated_slices_are_skipped_and_nothing_annotated_is_a_plain_error(tmp_path):
    image, store, _ = annotated_stack(tmp_path, 4, annotate=lambda n: [1, 3])
    assert export_annotations([image], tmp_path / "d.zarr", store).added == 2
    empty, empty_store, _ = annotated_stack(tmp_path / "other", 2, annotate=lambda n: [])
    with pytest.raises(DatasetError, match="no committed objects"):
        export_annotations([empty], tmp_path / "e.zarr", empty_store)
    assert not (tmp_path / "e.zarr").exists()


def test_the_annotators_embeddings_travel_when_the_encoder_matches(tmp_path):
    import zarr

    image, store, _ = annotated_stack(tmp_path, 2)
    rgb = sam_rgb(image.channels.plane((0,)), (0,))
    path = embedding_cache_path(tmp_path / "cache", "encoder-a", rgb)
    group = zarr.open_group(str(path), mode="w")  # micro-sam's layout of a cached 2D embedding
    group.create_array("features", data=np.ones((1, 256, 64, 64), np.float32))
    group.attrs.update(input_size=[1024, 1024], original_size=[96, 96])

    result = export_annotations(
        [image], tmp_path / "d.zarr", store, embeddings=EmbeddingSource(tmp_path / "cache", "encoder-a")
    )
    assert result.with_embeddings == 1  # slice 1 was never embedded
    dataset = open_dataset(tmp_path / "d.zarr")
    stored = [dataset.embedding(s, "encoder-a") for s in dataset.sample_ids()]
    assert sum(e is not None for e in stored) == 1
    assert all(dataset.embedding(s, "encoder-b") is None for s in dataset.sample_ids())


def test_which_objects_the_prompts_ask_for_batched_or_not():
    box_a, box_b = np.array([[0, 0], [0, 9], [9, 9], [9, 0]]), np.array([[20, 20], [20, 29], [29, 29], [29, 20]])
    points, kinds = np.array([[40, 40], [50, 50], [5, 5]]), [POSITIVE, POSITIVE, NEGATIVE]
    boxes_only = prompts_from_layers(np.zeros((0, 2)), [], [box_a, box_b])
    # boxes without points are one object each, batched or not (micro-sam's 2D annotator)
    for batched in (False, True):
        objects = object_prompts(boxes_only, batched)
        assert [list(o.box) for o in objects] == [[0, 0, 9, 9], [20, 20, 29, 29]] and objects[0].points is None
    everything = prompts_from_layers(points, kinds, [box_a, box_b])
    with pytest.raises(PromptError, match="tick Batched"):
        object_prompts(everything, batched=False)
    [one] = object_prompts(prompts_from_layers(points, kinds, [box_a]), batched=False)
    assert len(one.points) == 3 and list(one.box) == [0, 0, 9, 9]
    # batched: each box, then each positive point, is an object; the negative point goes with all
    objects = object_prompts(everything, batched=True)
    assert [o.box is not None for o in objects] == [True, True, False, False]
    assert all([5, 5] in o.points.tolist() and o.labels[-1] == 0 for o in objects)
    assert [o.points[0].tolist() for o in objects[2:]] == [[40, 40], [50, 50]] and list(objects[2].labels) == [1, 0]
    with pytest.raises(PromptError, match="only negative points"):
        object_prompts(prompts_from_layers(points[2:], kinds[2:], []), batched=True)
    assert object_prompts(prompts_from_layers(np.zeros((0, 2)), [], []), batched=True) == []


def test_prompts_channels_and_slices_from_what_the_user_chose():
    prompts = prompts_from_layers(
        np.array([[10, 20], [30, 40]]), [POSITIVE, NEGATIVE], [np.array([[5, 9], [5, 1], [2, 1], [2, 9]])]
    )
    np.testing.assert_array_equal(prompts.labels, [1, 0])
    np.testing.assert_array_equal(prompts.boxes, [[2, 1, 5, 9]])  # [y0, x0, y1, x1] whatever the drawing order
    assert prompts_from_layers(np.zeros((0, 2)), [], []).points is None

    assert sam_channels_choice(2, None, None) == (2,)
    assert sam_channels_choice(0, 3, 2) == (0, 3, 2)
    with pytest.raises(ImageError, match="both green and blue"):
        sam_channels_choice(0, 1, None)

    stack = ImageChannels.from_layer(np.zeros((4, 5, 64, 64), np.uint8), rgb=False, channel_axis=1, name="s")
    assert stack_index(stack, [2.4, 0, 10, 10], channel_axis=1) == (2,)
    assert stack_index(stack, [9, 0, 10, 10], channel_axis=1) == (3,)  # clipped to the last slice
