"""Never losing work (napari_raysam.annotator.annotations): autosaved labels, commits and undo."""

import json
import threading
import time

import numpy as np
import pytest

from napari_raysam.annotator.annotations import AnnotationStore, CommitError, CommitHistory
from napari_raysam.cluster import state_dir

KEY = "ab" * 32


def _disk(shape, centre, radius) -> np.ndarray:
    rows, cols = np.ogrid[: shape[0], : shape[1]]
    return (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= radius**2


# --- autosave -----------------------------------------------------------------------------------


def test_saved_labels_come_back(tmp_path):
    labels = np.zeros((70, 80), np.uint32)
    labels[10:20, 10:30] = 1
    labels[40:50, 5:9] = 7
    store = AnnotationStore(tmp_path)
    path = store.save(KEY, labels, source="cells")
    assert path == tmp_path / "annotations" / KEY[:32] / "labels.npy"
    meta = json.loads((path.parent / "meta.json").read_text())
    assert meta["shape"] == [70, 80] and meta["source"] == "cells" and meta["saved"]

    loaded = AnnotationStore(tmp_path).load(KEY, (70, 80))
    assert loaded.dtype == np.uint32
    np.testing.assert_array_equal(loaded, labels)
    assert not list(path.parent.glob(".*"))  # no temporary file left behind


def test_saving_again_replaces_the_previous_save(tmp_path):
    store = AnnotationStore(tmp_path)
    for n_objects in range(1, 4):
        labels = np.zeros((64, 64), np.uint32)
        labels[:n_objects] = np.arange(1, n_objects + 1)[:, None]
        store.save(KEY, labels)
    assert store.load(KEY, (64, 64)).max() == 3


def test_default_store_lives_in_the_state_folder():
    store = AnnotationStore()
    store.save(KEY, np.ones((64, 64), np.uint32))
    assert (state_dir() / "cache" / "annotations" / KEY[:32] / "labels.npy").is_file()


def test_nothing_saved_or_another_shape_gives_none(tmp_path):
    store = AnnotationStore(tmp_path)
    assert store.load(KEY, (70, 80)) is None
    store.save(KEY, np.ones((70, 80), np.uint32))
    assert store.load(KEY, (80, 70)) is None


def test_a_corrupt_save_gives_none_and_a_warning_naming_the_file(tmp_path):
    store = AnnotationStore(tmp_path)
    path = store.save(KEY, np.ones((70, 80), np.uint32))
    path.write_bytes(path.read_bytes()[:200])  # truncated, e.g. disk full
    with pytest.warns(UserWarning, match=str(path)):
        assert store.load(KEY, (70, 80)) is None
    path.write_bytes(b"not a numpy file")
    with pytest.warns(UserWarning, match="cannot be read"):
        assert store.load(KEY, (70, 80)) is None


def test_a_background_save_returns_at_once_and_loading_waits_for_it(tmp_path, monkeypatch):
    """A commit on a large image must not wait for its 400 MB write; the next load must still see it."""
    writes, writing = [], threading.Event()
    plain_save = AnnotationStore.save

    def slow_save(self, key, labels, source=""):
        writing.set()
        time.sleep(0.3)
        writes.append(int(labels.max()))
        return plain_save(self, key, labels, source)

    def labels_with(n_objects: int) -> np.ndarray:
        labels = np.zeros((64, 64), np.uint32)
        labels[:n_objects] = np.arange(1, n_objects + 1)[:, None]
        return labels

    monkeypatch.setattr(AnnotationStore, "save", slow_save)
    store = AnnotationStore(tmp_path)
    started = time.perf_counter()
    store.save_in_background(KEY, labels_with(1))
    assert time.perf_counter() - started < 0.2
    assert writing.wait(5)
    store.save_in_background(KEY, labels_with(2))  # both wait while the first is written
    store.save_in_background(KEY, labels_with(3))
    assert AnnotationStore(tmp_path).load(KEY, (64, 64)).max() == 3  # another store, as a reopened dock's
    assert writes == [1, 3]  # the second was overtaken by the third before its turn: written once, not twice


def test_a_failed_background_save_is_reported(tmp_path):
    (tmp_path / "annotations").write_text("a file where the folder should be")
    errors = []
    store = AnnotationStore(tmp_path)
    store.save_in_background(KEY, np.ones((8, 8), np.uint32), failed=errors.append)
    assert store.load(KEY, (8, 8)) is None
    assert len(errors) == 1 and isinstance(errors[0], OSError)

    def report_fails_too(error):  # e.g. the dock that asked was closed meanwhile
        raise RuntimeError("wrapped C/C++ object has been deleted")

    store.save_in_background(KEY, np.ones((8, 8), np.uint32), failed=report_fails_too)
    assert store.load(KEY, (8, 8)) is None  # load never raises


def test_a_background_save_that_fails_for_any_reason_is_reported(tmp_path, monkeypatch):
    """Not only a full disk: whatever stops the write, the person annotating must hear of it."""

    def broken_save(self, key, labels, source=""):
        raise MemoryError("no room for the copy")

    monkeypatch.setattr(AnnotationStore, "save", broken_save)
    errors = []
    store = AnnotationStore(tmp_path)
    store.save_in_background(KEY, np.ones((8, 8), np.uint32), failed=errors.append)
    assert store.load(KEY, (8, 8)) is None
    assert [type(error) for error in errors] == [MemoryError]


# --- commits and undo ---------------------------------------------------------------------------


def test_commits_get_new_ids_and_never_overwrite_committed_objects():
    labels = np.zeros((64, 64), np.uint32)
    labels[0, 0] = 5  # drawn by hand
    history = CommitHistory()
    first = _disk(labels.shape, (20, 20), 8)
    assert history.commit_labels(labels, first) == [6]
    overlapping = _disk(labels.shape, (20, 30), 8)
    assert history.commit_labels(labels, overlapping) == [7]
    assert (labels[first] == 6).all()  # the first object is intact
    assert (labels == 7).sum() == (overlapping & ~first).sum()
    with pytest.raises(CommitError, match="object lies entirely on already committed objects; undo or erase them first"):
        history.commit_labels(labels, first)


def test_undo_removes_the_last_commit_only():
    labels = np.zeros((64, 64), np.uint32)
    history = CommitHistory()
    history.commit_labels(labels, _disk(labels.shape, (20, 20), 8))
    before = labels.copy()
    history.commit_labels(labels, _disk(labels.shape, (40, 40), 8))
    assert history.undo(labels) == [2]
    np.testing.assert_array_equal(labels, before)
    assert history.can_undo
    assert history.undo(labels) == [1]
    assert not labels.any() and not history.can_undo
    assert history.undo(labels) == []


def test_an_automatic_segmentation_is_committed_and_undone_as_one_step():
    labels = np.zeros((64, 64), np.uint32)
    history = CommitHistory()
    history.commit_labels(labels, _disk(labels.shape, (10, 10), 5))
    automatic = np.zeros((64, 64), np.uint32)
    automatic[_disk(labels.shape, (10, 10), 5)] = 3  # lies entirely on the committed object
    automatic[30:40, 30:40] = 10
    automatic[50:60, 5:15] = 20
    assert history.commit_labels(labels, automatic) == [2, 3]
    assert (labels[30:40, 30:40] == 2).all() and (labels[50:60, 5:15] == 3).all()
    assert history.undo(labels) == [2, 3]
    assert set(np.unique(labels)) == {0, 1}
    with pytest.raises(CommitError, match="entirely on already committed objects"):
        history.commit_labels(labels, np.where(labels == 1, 7, 0))  # nothing is free: no undo step either
    assert history.undo(labels) == [1] and not labels.any()


def test_a_proposal_cropped_to_its_box_commits_where_it_lies_and_undoes_there():
    labels = np.zeros((64, 64), np.uint32)
    labels[30, 40] = 1  # committed before: the crop's object keeps off it
    history = CommitHistory()
    crop = np.zeros((10, 12), np.uint8)  # rows 25-34, columns 35-46 of the image
    crop[2:8, 3:9] = 1
    assert history.commit_labels(labels, crop, origin=(25, 35)) == [2]
    expected = np.zeros_like(labels, bool)
    expected[27:33, 38:44] = True
    expected[30, 40] = False
    np.testing.assert_array_equal(labels == 2, expected)
    assert history.undo(labels) == [2] and set(np.unique(labels)) == {0, 1}
    with pytest.raises(ValueError, match="does not lie inside"):
        history.commit_labels(labels, crop, origin=(60, 0))


def test_undo_keeps_hand_edits_made_after_the_commit():
    labels = np.zeros((64, 64), np.uint32)
    history = CommitHistory()
    mask = _disk(labels.shape, (30, 30), 10)
    history.commit_labels(labels, mask)
    labels[25:35, 25:35] = 9  # painted over part of the committed object
    labels[0:5, 0:5] = 4  # painted elsewhere
    assert history.undo(labels) == [1]
    assert (labels[25:35, 25:35] == 9).all() and (labels[0:5, 0:5] == 4).all()
    assert not (labels == 1).any()


def test_clear_forgets_the_commits():
    labels = np.zeros((64, 64), np.uint32)
    history = CommitHistory()
    history.commit_labels(labels, _disk(labels.shape, (30, 30), 10))
    history.clear()
    assert not history.can_undo and history.undo(labels) == [] and labels.any()
