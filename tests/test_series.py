"""Image series without Qt (napari_raysam.annotator.series): planes made ready, which are annotated, the position."""

from __future__ import annotations

import numpy as np
import pytest

from napari_raysam.annotator.annotations import AnnotationStore
from napari_raysam.annotator.image_source import ImageChannels, ImageError, content_key, sam_rgb
from napari_raysam.annotator.series import annotated_planes, prepare_plane, series_length, series_summary, step_index
from synthetic import synthetic_cells


def _stack(n: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.stack([synthetic_cells(rng, shape=(80, 96), n_channels=1, n_cells=3)[0][0] for _ in range(n)])


def test_a_prepared_plane_is_what_annotating_it_needs():
    stack = _stack(3)
    channels = ImageChannels.from_layer(stack, rgb=False, channel_axis=None, name="frames")
    prepared = prepare_plane(channels, (1,), (0,), "frames")
    np.testing.assert_array_equal(prepared.plane, stack[1:2])
    np.testing.assert_array_equal(prepared.rgb, sam_rgb(stack[1], (0,)))
    assert prepared.key == content_key(stack[1:2]) and prepared.index == (1,) and prepared.sam_channels == (0,)


def test_a_plane_sam_cannot_segment_is_named():
    stack = _stack(2).astype(np.float32)
    stack[1, 5, 5] = np.nan
    channels = ImageChannels.from_layer(stack, rgb=False, channel_axis=None, name="frames")
    with pytest.raises(ImageError, match="layer 'frames', slice 1: 1 pixels are NaN"):
        prepare_plane(channels, (1,), (0,), "frames")


def test_steps_stop_at_either_end_and_a_2d_image_has_none():
    assert step_index((0,), 3, 1) == (1,) and step_index((2,), 3, -1) == (1,)
    assert step_index((2,), 3, 1) is None and step_index((0,), 3, -1) is None
    assert step_index((), 1, 1) is None


def test_a_plane_is_annotated_when_its_saved_labels_hold_an_object(tmp_path):
    stack = _stack(3)
    channels = ImageChannels.from_layer(stack, rgb=False, channel_axis=None, name="frames")
    store = AnnotationStore(tmp_path)
    labels = np.zeros(stack.shape[1:], np.uint32)
    store.save(content_key(stack[2:3]), labels)  # saved, but every object undone
    labels[10:20, 10:20] = 1
    store.save(content_key(stack[1:2]), labels)
    progress = []
    assert annotated_planes(channels, store, lambda done, total: progress.append((done, total))) == [False, True, False]
    assert progress == [(1, 3), (2, 3), (3, 3)]
    assert series_length(channels) == 3
    assert series_summary((1,), [False, True, False]) == "image 2 of 3 · 1 of 3 annotated"

    single = ImageChannels.from_layer(stack[1], rgb=False, channel_axis=None, name="frame")
    # the same pixels opened as a 2D image are the same annotated image
    assert series_length(single) == 1 and annotated_planes(single, store) == [True]
    assert series_summary((), [True]) == "1 of 1 annotated"
