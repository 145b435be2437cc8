"""SAM session (napari_raysam.annotator.session): cached embeddings, model changes, prompts -> masks, tiling."""

import gc

import numpy as np
import pytest
import torch
from micro_sam.instance_segmentation import (
    AutomaticMaskGenerator,
    DecoderAdapter,
    InstanceSegmentationWithDecoder,
)
from synthetic import synthetic_cells

from backend.models import build_sam, save_model_folder
from napari_raysam.annotator import session as session_module
from napari_raysam.annotator.image_source import sam_rgb
from napari_raysam.annotator.prompts import ObjectPrompt
from napari_raysam.annotator.session import AIS, AMG, SamSession, SessionError

MODEL = "random:tiny"


@pytest.fixture(scope="module")
def rgb():
    """A (128, 128, 3) uint8 SAM input of synthetic cells."""
    image, _ = synthetic_cells(np.random.default_rng(0), shape=(128, 128), n_cells=6)
    return sam_rgb(image, (0, 1, 2))


def _count_encoder_calls(session: SamSession) -> list:
    """Record every run of the session's image encoder; returns the (growing) list of calls."""
    calls = []
    encoder = session.model.sam.image_encoder
    forward = encoder.forward

    def counting_forward(x):
        calls.append(tuple(x.shape))
        return forward(x)

    encoder.forward = counting_forward
    return calls


def _record_calls(monkeypatch, cls, name) -> list:
    """Record each call of ``cls.name`` (still running it); returns the (growing) list of calls."""
    calls = []
    method = getattr(cls, name)

    def recording(self, *args, **kwargs):
        calls.append(kwargs)
        return method(self, *args, **kwargs)

    monkeypatch.setattr(cls, name, recording)
    return calls


@pytest.fixture
def session(rgb):
    session = SamSession()
    session.set_model(MODEL)
    session.set_image(rgb)
    return session


def _save_variant(tmp_path, name, change):
    """A model folder of the tiny model with ``change(sam)`` applied; returns its path."""
    sam = build_sam("tiny")
    with torch.no_grad():
        change(sam)
    return str(save_model_folder(
        sam, tmp_path / name, model_type="tiny", base_model=MODEL, mode="full",
        dataset_fingerprint=None, metrics={}, config={},
    ))


# --- embeddings ---------------------------------------------------------------------------------


def test_embeddings_are_computed_once_then_read_from_the_disk_cache(rgb, tmp_path):
    session = SamSession(tmp_path / "cache")
    session.set_model(MODEL)
    calls = _count_encoder_calls(session)
    assert not session.is_cached(rgb)
    progress = []
    session.set_image(rgb, progress=lambda done, total: progress.append((done, total)))
    assert len(calls) == 1 and session.image_shape == (128, 128) and not session.tiled
    assert progress[0][0] == 0 and progress[-1][0] == progress[-1][1]
    assert session.is_cached(rgb)

    session.set_image(rgb)
    assert len(calls) == 1

    fresh = SamSession(tmp_path / "cache")  # e.g. napari restarted
    fresh.set_model(MODEL)
    fresh_calls = _count_encoder_calls(fresh)
    fresh.set_image(rgb)
    assert fresh_calls == []
    np.testing.assert_array_equal(fresh.segment(points=[[60, 60]]), session.segment(points=[[60, 60]]))

    # One complete cache entry, named by encoder and image; nothing half-written beside it.
    entries = list((tmp_path / "cache" / "embeddings").glob("*/*"))
    assert [entry.name.endswith(".zarr") and not entry.name.startswith(".") for entry in entries] == [True]


def test_an_interrupted_computation_leaves_nothing_that_is_read_back(rgb, tmp_path):
    session = SamSession(tmp_path)
    session.set_model(MODEL)
    encoder = session.model.sam.image_encoder
    forward = encoder.forward

    def crash(x):
        raise KeyboardInterrupt

    encoder.forward = crash
    with pytest.raises(KeyboardInterrupt):
        session.set_image(rgb)
    assert not session.is_cached(rgb) and session.image_shape is None
    assert list((tmp_path / "embeddings").glob("*/*")) == []

    encoder.forward = forward
    session.set_image(rgb)
    assert session.is_cached(rgb)


def test_a_cache_entry_of_other_tiling_is_computed_again(rgb, tmp_path, monkeypatch):
    session = SamSession(tmp_path)
    session.set_model(MODEL)
    session.set_image(rgb)
    monkeypatch.setattr(session_module, "TILING_THRESHOLD", 100)
    calls = _count_encoder_calls(session)
    with pytest.warns(UserWarning, match="computing them again"):
        session.set_image(rgb)
    assert session.tiled and len(calls) == 1


def test_set_image_needs_a_model(rgb):
    with pytest.raises(SessionError, match="choose a model first"):
        SamSession().set_image(rgb)


# --- model changes ------------------------------------------------------------------------------


def test_a_model_with_the_same_image_encoder_keeps_the_embeddings(session, tmp_path):
    fine_tuned = _save_variant(tmp_path, "decoder", lambda sam: sam.mask_decoder.iou_token.weight.add_(1.0))
    calls_before = _count_encoder_calls(session)
    assert session.set_model(MODEL) is True
    assert session.set_model(fine_tuned) is True
    assert session.image_shape == (128, 128)
    assert session.segment(points=[[60, 60]]).shape == (128, 128)
    assert calls_before == []


def test_a_model_with_another_image_encoder_resets_the_image(session, tmp_path):
    other = _save_variant(tmp_path, "full", lambda sam: sam.image_encoder.neck[0].weight.mul_(2.0))
    assert session.set_model(other) is False
    assert session.image_shape is None
    with pytest.raises(SessionError, match="compute the embeddings first"):
        session.segment(points=[[60, 60]])


# --- prompts ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prompts",
    [
        {"points": [[60.0, 60.0]], "point_labels": [1]},
        {"points": [[60.0, 60.0], [20.0, 100.0]], "point_labels": [1, 0]},
        {"box": [40.0, 40.0, 80.0, 90.0]},
        {"box": [40.0, 40.0, 80.0, 90.0], "points": [[60.0, 60.0], [45.0, 85.0]], "point_labels": [1, 0]},
        {"box": [40.0, 40.0, 80.0, 90.0], "points": [[45.0, 85.0]], "point_labels": [0]},
    ],
    ids=["point", "positive+negative", "box", "box+points", "box+negative"],
)
def test_segment_returns_one_mask_of_the_image(session, prompts):
    mask = session.segment(**prompts)
    assert mask.shape == (128, 128) and mask.dtype == bool


def test_points_outside_the_image_are_dropped(session):
    inside = session.segment(points=[[60, 60], [20, 100]], point_labels=[1, 0])
    with_outside = session.segment(
        points=[[60, 60], [20, 100], [-30, 5], [64, 400]], point_labels=[1, 0, 1, 0]
    )
    np.testing.assert_array_equal(with_outside, inside)


def test_a_box_is_clipped_to_the_image(session):
    np.testing.assert_array_equal(
        session.segment(box=[-50, 40, 80, 500]), session.segment(box=[0, 40, 80, 128])
    )


@pytest.mark.parametrize(
    ("prompts", "message"),
    [
        ({}, "add a positive point or a box"),
        ({"points": [[60, 60]], "point_labels": [0]}, "add a positive point or a box"),
        ({"points": [[-5, 60], [60, 300]], "point_labels": [1, 1]}, "all points are outside the image"),
        ({"box": [200, 200, 300, 300]}, "box lies outside the image"),
    ],
)
def test_prompts_that_cannot_segment_are_refused(session, prompts, message):
    with pytest.raises(SessionError, match=message):
        session.segment(**prompts)


def test_several_objects_get_their_own_ids_and_overlaps_go_to_the_smaller(session, monkeypatch):
    big, small, empty = np.zeros((3, 128, 128), bool)
    big[10:60, 10:60], small[40:50, 40:80] = True, True
    masks = {1: big, 2: small, 3: empty}
    monkeypatch.setattr(session, "segment", lambda points, labels, box: masks[int(box[0])])
    progress = []
    labels = session.segment_objects(
        [ObjectPrompt(None, None, np.array([k, 0, 5, 5])) for k in (1, 2, 3)], lambda *p: progress.append(p)
    )
    assert labels.dtype == np.uint32 and set(np.unique(labels)) == {0, 1, 2}  # the empty third has no pixels
    assert (labels[small] == 2).all() and (labels[big & ~small] == 1).all()
    assert progress[-1] == (3, 3)


def test_batched_objects_are_segmented_as_one_object_each_and_errors_name_the_object(session):
    objects = [ObjectPrompt(None, None, np.array([40.0, 40.0, 80.0, 90.0])), ObjectPrompt(np.array([[60.0, 20.0]]), np.array([1]), None)]
    labels = session.segment_objects(objects)
    for object_id, prompt in enumerate(objects, 1):
        alone = session.segment(prompt.points, prompt.labels, prompt.box)
        assert (labels == object_id).sum() <= alone.sum() and not (labels == object_id)[~alone].any()
    with pytest.raises(SessionError, match="object 2 of 2: the box lies outside the image"):
        session.segment_objects([objects[0], ObjectPrompt(None, None, np.array([200.0, 200, 300, 300]))])


def test_segment_needs_an_image():
    session = SamSession()
    session.set_model(MODEL)
    with pytest.raises(SessionError, match="compute the embeddings first"):
        session.segment(points=[[60, 60]])


# --- automatic segmentation and tiling ----------------------------------------------------------


def test_automatic_segmentation_gives_uint32_instance_labels(session, monkeypatch):
    decoder_runs = _record_calls(monkeypatch, InstanceSegmentationWithDecoder, "generate")
    progress = []
    assert session.automatic_mode == AMG  # the model has no instance segmentation decoder
    labels = session.automatic_segmentation(
        progress=lambda done, total: progress.append((done, total)), points_per_side=4
    )
    assert labels.shape == (128, 128) and labels.dtype == np.uint32
    assert progress[0][0] == 0 and progress[-1][0] == progress[-1][1]
    assert decoder_runs == []


def test_point_grid_objects_under_the_minimum_size_are_dropped(session, monkeypatch):
    found = np.zeros((128, 128), np.uint32)
    found[0:3, 0:3], found[10:40, 10:40], found[50:52, 50:60], found[60:90, 60:90] = 1, 2, 3, 4  # 9, 900, 20, 900 px
    monkeypatch.setattr(AutomaticMaskGenerator, "generate", lambda self, **kwargs: found.copy())
    labels = session.automatic_segmentation(points_per_side=4, min_object_size=21)
    assert set(np.unique(labels)) == {0, 1, 2}  # the two large ones, renumbered
    assert (labels[10:40, 10:40] == 1).all() and (labels[60:90, 60:90] == 2).all() and not labels[0:3, 0:3].any()
    np.testing.assert_array_equal(session.automatic_segmentation(points_per_side=4), found)  # 0: all kept


def test_point_grid_segmentation_pauses_garbage_collection_and_restores_it(session, monkeypatch):
    """Collections of micro-sam's mask lists froze napari's event loop; they wait until the end."""
    collector_on = []
    generate = AutomaticMaskGenerator.generate
    monkeypatch.setattr(
        AutomaticMaskGenerator, "generate",
        lambda self, **kwargs: collector_on.append(gc.isenabled()) or generate(self, **kwargs),
    )
    assert gc.isenabled()
    session.automatic_segmentation(points_per_side=4)
    assert collector_on == [False] and gc.isenabled()


def test_a_model_with_a_decoder_segments_with_it(rgb, decoder_model, tmp_path, monkeypatch):
    grid_runs = _record_calls(monkeypatch, AutomaticMaskGenerator, "generate")
    decoder_runs = _record_calls(monkeypatch, InstanceSegmentationWithDecoder, "generate")
    session = SamSession(tmp_path)
    assert session.automatic_mode is None
    session.set_model(decoder_model)
    assert session.automatic_mode == AIS
    session.set_image(rgb)
    progress = []
    labels = session.automatic_segmentation(
        progress=lambda done, total: progress.append((done, total)), min_object_size=5
    )
    assert labels.shape == (128, 128) and labels.dtype == np.uint32
    assert progress[0][0] == 0 and progress[-1][0] == progress[-1][1]
    assert len(decoder_runs) == 1 and decoder_runs[0]["min_size"] == 5 and grid_runs == []

    session.set_model(MODEL)  # back to a model without decoder: the point grid again
    assert session.automatic_mode == AMG


def test_large_images_are_embedded_and_segmented_tile_by_tile(tmp_path, monkeypatch):
    monkeypatch.setattr(session_module, "TILING_THRESHOLD", 100)
    monkeypatch.setattr(session_module, "TILE_SHAPE", (160, 160))
    monkeypatch.setattr(session_module, "HALO", (32, 32))
    image, _ = synthetic_cells(np.random.default_rng(1), shape=(300, 300), n_cells=20)
    rgb = sam_rgb(image, (0, 1, 2))
    session = SamSession(tmp_path)
    session.set_model(MODEL)
    calls = _count_encoder_calls(session)
    progress = []
    session.set_image(rgb, progress=lambda done, total: progress.append((done, total)))
    assert session.tiled and session.image_shape == (300, 300)
    assert len(calls) == 4 and progress[-1] == (4, 4)  # 2 x 2 tiles, reported one by one

    mask = session.segment(points=[[150, 150]])
    assert mask.shape == (300, 300) and mask.dtype == bool
    # The first tile (0..160) with its 32-pixel halo holds the whole mask.
    assert not mask[192:].any() and not mask[:, 192:].any()
    assert session.segment(box=[140, 140, 170, 175], points=[[150, 150]]).shape == (300, 300)

    labels = session.automatic_segmentation(points_per_side=2)
    assert labels.shape == (300, 300) and labels.dtype == np.uint32

    session.set_image(rgb)  # tiled embeddings are cached too
    assert len(calls) == 4


def test_large_images_are_segmented_with_the_decoder_tile_by_tile(decoder_model, tmp_path, monkeypatch):
    monkeypatch.setattr(session_module, "TILING_THRESHOLD", 100)
    monkeypatch.setattr(session_module, "TILE_SHAPE", (160, 160))
    monkeypatch.setattr(session_module, "HALO", (32, 32))

    # A stand-in for the decoder network (slow on a CPU at SAM's 1024 x 1024): foreground with
    # center and boundary distances that seed one object per 64 x 64 block of the 1024 input.
    def blocky_maps(embeddings):
        batch = embeddings.shape[0]
        yy, xx = torch.meshgrid(torch.arange(256), torch.arange(256), indexing="ij")
        distance = torch.maximum((yy % 16 - 7.5).abs(), (xx % 16 - 7.5).abs()) / 8
        maps = torch.stack([torch.ones(256, 256), distance, distance])
        return maps.expand(batch, 3, 256, 256)

    monkeypatch.setattr(DecoderAdapter, "_forward_impl", lambda self, embeddings: blocky_maps(embeddings))
    decoder_runs = _record_calls(monkeypatch, InstanceSegmentationWithDecoder, "generate")
    image, _ = synthetic_cells(np.random.default_rng(1), shape=(300, 300), n_cells=20)
    session = SamSession(tmp_path)
    session.set_model(decoder_model)
    progress = []
    session.set_image(sam_rgb(image, (0, 1, 2)))
    labels = session.automatic_segmentation(progress=lambda done, total: progress.append((done, total)))
    assert session.tiled and labels.shape == (300, 300) and labels.dtype == np.uint32
    assert progress[-1] == (4, 4)  # the decoder ran per tile
    assert decoder_runs[0]["tile_shape"] == (160, 160) and decoder_runs[0]["halo"] == (32, 32)
    assert labels.max() > 1  # the seeds became separate objects


def test_the_next_image_is_embedded_ahead_without_touching_the_current_one(rgb, tmp_path):
    session = SamSession(tmp_path / "cache")
    session.set_model(MODEL)
    session.set_image(rgb)
    before = session.segment(points=[[60, 60]])
    image, _ = synthetic_cells(np.random.default_rng(1), shape=(96, 112), n_cells=4)
    following = sam_rgb(image, (0, 1, 2))
    calls = _count_encoder_calls(session)
    progress = []
    assert session.cache_embeddings(following, lambda done, total: progress.append((done, total)))
    assert len(calls) == 1 and progress[-1][0] == progress[-1][1]
    # the current image is still the one segmented
    assert session.image_shape == (128, 128)
    np.testing.assert_array_equal(session.segment(points=[[60, 60]]), before)
    assert not session.cache_embeddings(following)  # cached: nothing computed twice
    session.set_image(following)
    assert len(calls) == 1 and session.image_shape == (96, 112)


def test_a_gpu_is_offered_first_and_the_cpu_always(monkeypatch):
    from napari_raysam.annotator.devices import available_devices

    assert available_devices()[-1] == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert available_devices() == ["cuda:0", "cuda:1", "cpu"]
