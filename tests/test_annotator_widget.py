"""The SAM annotator dock in a real napari viewer (Xvfb), driven through its buttons and keys."""

from __future__ import annotations

import errno
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import npe2
import numpy as np
import pytest
import safetensors.torch
import torch
from qtpy.QtCore import Qt

from backend.dataset import open_dataset
from backend.models import load_model, save_model_folder
from napari_raysam import cluster as clusters
from napari_raysam.annotator.annotations import AnnotationStore
from napari_raysam.annotator.prompts import NEGATIVE
from napari_raysam.llvm_clash import keep_triton_out_if_llvm_is_loaded
from napari_raysam.widgets import annotator as annotator_module
from napari_raysam.widgets.dock import LoadingDock
from napari_raysam.widgets.annotator import (
    AUTOMATIC_LAYER,
    BOXES_LAYER,
    COMMITTED_LAYER,
    CURRENT_LAYER,
    POINTS_LAYER,
    AnnotatorWidget,
    annotator_for,
)
from qt_helpers import click, wholly_in_view
from synthetic import synthetic_cells

WORKER_TIMEOUT_MS = 120_000


@pytest.fixture
def annotator(make_napari_viewer, qtbot, tmp_path):
    viewer = make_napari_viewer(show=True)
    widget = AnnotatorWidget(viewer, cache_dir=tmp_path / "cache")
    viewer.window.add_dock_widget(widget, name="SAM annotator")
    return viewer, widget


def wait_for_worker(qtbot, widget: AnnotatorWidget) -> None:
    qtbot.waitUntil(lambda: widget._worker is None, timeout=WORKER_TIMEOUT_MS)


def press(qtbot, viewer, key, modifier=Qt.KeyboardModifier.NoModifier) -> None:
    """A key press on napari's canvas, where the viewer's key bindings listen."""
    qtbot.keyClick(viewer.window._qt_viewer.canvas.native, key, modifier)


def load_tiny_model(qtbot, widget: AnnotatorWidget) -> None:
    widget.model_panel.combo.setCurrentText("random:tiny")
    qtbot.mouseClick(widget.model_panel.load_button, Qt.MouseButton.LeftButton)
    wait_for_worker(qtbot, widget)
    assert widget.session.model is not None, widget.status.text()


def embed(qtbot, widget: AnnotatorWidget) -> None:
    """Load random:tiny and compute the embeddings of the chosen image, through the buttons."""
    load_tiny_model(qtbot, widget)
    click(qtbot, widget.segment_panel.embed_button)
    wait_for_worker(qtbot, widget)


def shown_proposal(viewer, image_name: str) -> np.ndarray:
    """What the current-object layer shows, as labels the size of the image ``image_name``: the
    layer holds the proposed objects' bounding box, placed on the image by its translation."""
    layer, image = viewer.layers[CURRENT_LAYER], viewer.layers[image_name]
    top, left = np.rint((np.asarray(layer.translate) - image.translate[-2:]) / image.scale[-2:]).astype(int)
    full = np.zeros(image.data.shape[-2:], layer.data.dtype)
    full[top:top + layer.data.shape[0], left:left + layer.data.shape[1]] = layer.data
    return full


def propose_square(widget: AnnotatorWidget, square) -> None:
    """Show ``square`` (a 2D slice) as the proposed object, as Segment would (random weights propose nothing reliable)."""
    proposal = np.zeros(widget.session.image_shape, np.uint8)
    proposal[square] = 1
    widget.layers.show(CURRENT_LAYER, proposal)


def test_full_flow_through_buttons_and_keys(annotator, qtbot, tmp_path):
    viewer, widget = annotator
    image, truth = synthetic_cells(np.random.default_rng(0), shape=(128, 128), n_channels=1, n_cells=6)
    viewer.add_image(image[0], name="cells")
    embed(qtbot, widget)
    assert "embeddings ready" in widget.status.text()
    assert widget.segment_panel.segment_button.isEnabled()

    # a positive point on a cell, then T and a negative point on the background
    cell = np.argwhere(truth == truth.max())[0]
    points = viewer.layers[POINTS_LAYER]
    points.add(cell)
    press(qtbot, viewer, Qt.Key.Key_T)
    points.add([2, 2])
    assert list(points.features["prompt"]) == ["positive", "negative"]
    calls = []
    segment = widget.session.segment
    threads = []
    widget.session.segment = lambda *args: threads.append(threading.current_thread()) or calls.append(args) or segment(*args)
    press(qtbot, viewer, Qt.Key.Key_S)
    wait_for_worker(qtbot, widget)
    assert threads and threading.main_thread() not in threads  # segmented off napari's event loop
    prompt_points, prompt_labels, box = calls[-1]
    np.testing.assert_allclose(prompt_points, [cell, [2, 2]])
    assert list(prompt_labels) == [1, 0] and box is None
    np.testing.assert_array_equal(shown_proposal(viewer, "cells") > 0, segment(prompt_points, prompt_labels, None))

    # whatever the random model proposes, commit writes exactly that as object 1
    widget.layers.show(CURRENT_LAYER, (truth == truth.max()).astype(np.uint8))  # a known object to commit
    press(qtbot, viewer, Qt.Key.Key_C)
    committed = viewer.layers[COMMITTED_LAYER].data
    np.testing.assert_array_equal(committed == 1, truth == truth.max())
    assert len(points.data) == 0 and not viewer.layers[CURRENT_LAYER].data.any()

    # a box prompt, segment with the button
    ys, xs = np.nonzero(truth == 1)
    viewer.layers[BOXES_LAYER].add_rectangles(np.array([[ys.min(), xs.min()], [ys.max(), xs.max()]]))
    click(qtbot, widget.segment_panel.segment_button)
    wait_for_worker(qtbot, widget)
    assert calls[-1][2] == pytest.approx([ys.min(), xs.min(), ys.max(), xs.max()])

    # automatic segmentation in the background, commit all, undo takes back the whole batch
    widget.segment_panel.grid_spin.setValue(8)
    click(qtbot, widget.segment_panel.automatic_button)
    wait_for_worker(qtbot, widget)
    automatic = viewer.layers[AUTOMATIC_LAYER].data
    assert automatic.shape == (128, 128) and automatic.dtype == np.uint32
    viewer.layers[AUTOMATIC_LAYER].data = truth.copy()  # random weights find nothing reliable: commit known objects
    click(qtbot, widget.segment_panel.commit_automatic_button)
    committed = viewer.layers[COMMITTED_LAYER].data
    assert set(np.unique(committed)) == set(range(int(committed.max()) + 1)) and committed.max() == 6
    press(qtbot, viewer, Qt.Key.Key_U)
    np.testing.assert_array_equal(viewer.layers[COMMITTED_LAYER].data, (truth == truth.max()).astype(np.uint32))

    # export appends the image and its committed labels
    data = tmp_path / "annotations.zarr"
    widget.export_panel.dataset_edit.setText(str(data))
    widget.export_panel.split_combo.setCurrentText("val")
    click(qtbot, widget.export_panel.button)
    wait_for_worker(qtbot, widget)
    dataset = open_dataset(data)
    [sample] = dataset.sample_ids("val")
    np.testing.assert_array_equal(dataset.image(sample)[0], image[0])
    np.testing.assert_array_equal(dataset.labels(sample), viewer.layers[COMMITTED_LAYER].data)


def test_opening_an_image_reuses_the_docks_layers_and_allocates_nothing_at_its_size(annotator, qtbot):
    viewer, widget = annotator
    ours = {name: viewer.layers[name] for name in (COMMITTED_LAYER, AUTOMATIC_LAYER, CURRENT_LAYER, BOXES_LAYER, POINTS_LAYER)}
    image, _ = synthetic_cells(np.random.default_rng(1), shape=(160, 200), n_channels=1, n_cells=4)
    viewer.add_image(image[0], name="cells", scale=(0.5, 0.5), translate=(10, 20))
    assert list(viewer.layers)[-5:] == list(ours.values())  # the same layers, above the image
    for name in (COMMITTED_LAYER, CURRENT_LAYER, AUTOMATIC_LAYER):
        assert ours[name].data.size == 1 and tuple(ours[name].scale) == (0.5, 0.5)  # placed on it, still empty
    assert not ours[COMMITTED_LAYER].editable  # nothing to paint on before a plane is read
    # the view frames the whole image (80 x 100 in world units), as napari does for the first layer it gets
    def framed() -> bool:
        height, width = viewer.window._qt_viewer.canvas.size
        y, x = viewer.camera.center[-2:]
        whole = viewer.camera.zoom * 80 <= height and viewer.camera.zoom * 100 <= width
        return whole and abs(y - 50) < 1 and abs(x - 70) < 1

    qtbot.waitUntil(framed, timeout=2000)
    embed(qtbot, widget)
    assert ours[COMMITTED_LAYER].data.shape == (160, 200) and ours[COMMITTED_LAYER].editable
    assert all(viewer.layers[name] is made for name, made in ours.items())


def test_committed_objects_survive_closing_and_reopening(make_napari_viewer, qtbot, tmp_path):
    image, truth = synthetic_cells(np.random.default_rng(1), shape=(96, 128), n_channels=1, n_cells=4)
    cache = tmp_path / "cache"
    for attempt in range(2):
        viewer = make_napari_viewer()
        widget = AnnotatorWidget(viewer, cache_dir=cache)
        viewer.add_image(image[0], name=f"cells opened {attempt}")
        embed(qtbot, widget)
        if attempt == 0:
            widget.layers.show(CURRENT_LAYER, (truth == 2).astype(np.uint8))
            click(qtbot, widget.segment_panel.commit_button)
        else:
            assert "loading cached embeddings" not in widget.status.text()  # the final message replaced it
            np.testing.assert_array_equal(viewer.layers[COMMITTED_LAYER].data, (truth == 2).astype(np.uint32))
        viewer.close()


def test_hand_painting_is_autosaved(annotator, qtbot):
    viewer, widget = annotator
    image, _ = synthetic_cells(np.random.default_rng(2), shape=(96, 96), n_channels=1, n_cells=3)
    viewer.add_image(image[0], name="cells")
    embed(qtbot, widget)
    committed = viewer.layers[COMMITTED_LAYER]
    committed.paint((40, 40), 7)
    qtbot.waitUntil(lambda: (saved := widget.store.load(widget._plane_key, (96, 96))) is not None and saved[40, 40] == 7)


def test_a_commit_does_not_wait_for_its_autosave(annotator, qtbot, monkeypatch):
    """Writing a 10,000 x 10,000 image's labels takes ~1 s (docs/BENCHMARKS.md): on napari's thread
    that froze the viewer at every commit."""
    viewer, widget = annotator
    image, _ = synthetic_cells(np.random.default_rng(2), shape=(96, 96), n_channels=1, n_cells=3)
    viewer.add_image(image[0], name="cells")
    embed(qtbot, widget)
    plain_save = AnnotationStore.save

    def slow_save(self, *args, **kwargs):
        time.sleep(1.0)
        return plain_save(self, *args, **kwargs)

    monkeypatch.setattr(AnnotationStore, "save", slow_save)
    propose_square(widget, np.s_[5:15, 5:15])
    started = time.perf_counter()
    click(qtbot, widget.segment_panel.commit_button)
    assert time.perf_counter() - started < 0.5 and widget.status.text() == "committed object 1"
    assert widget.store.load(widget._plane_key, (96, 96))[10, 10] == 1


def test_commit_and_undo_show_on_screen_what_a_whole_redraw_shows(annotator, qtbot):
    """They redraw only the box they changed (a whole redraw of a 10,000 x 10,000 layer stalls napari)."""
    viewer, widget = annotator
    image, _ = synthetic_cells(np.random.default_rng(2), shape=(96, 96), n_channels=1, n_cells=3)
    viewer.add_image(image[0], name="cells", visible=False)
    embed(qtbot, widget)
    committed = viewer.layers[COMMITTED_LAYER]

    def screen() -> np.ndarray:
        return viewer.screenshot(canvas_only=True, flash=False)

    empty = screen()
    propose_square(widget, np.s_[20:60, 30:70])
    click(qtbot, widget.segment_panel.commit_button)
    shown = screen()
    assert not np.array_equal(shown, empty)
    committed.refresh()
    np.testing.assert_array_equal(screen(), shown)
    click(qtbot, widget.segment_panel.undo_button)
    np.testing.assert_array_equal(screen(), empty)


def test_an_autosave_that_fails_says_what_to_do(annotator, qtbot, monkeypatch):
    viewer, widget = annotator
    image, _ = synthetic_cells(np.random.default_rng(2), shape=(96, 96), n_channels=1, n_cells=3)
    viewer.add_image(image[0], name="cells")
    embed(qtbot, widget)

    def full_disk(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(AnnotationStore, "save", full_disk)
    propose_square(widget, np.s_[5:15, 5:15])
    click(qtbot, widget.segment_panel.commit_button)
    qtbot.waitUntil(lambda: widget.status.text().startswith(
        "could not autosave the annotations (No space left on device): free disk space"))


def test_hpa_four_channels_as_one_layer_and_as_separate_layers(annotator, qtbot, tmp_path):
    viewer, widget = annotator
    image, _ = synthetic_cells(np.random.default_rng(3), shape=(96, 96), n_channels=4, n_cells=3)
    viewer.add_image(image, name="hpa")
    # a short first axis is taken as channels; HPA's default SAM mapping is offered
    assert widget.image.layout_combo.currentText() == "channels"
    assert [combo.count() for combo in widget.image.channel_combos] == [4, 5, 5]
    widget.image.channel_combos[1].setCurrentIndex(0)  # green: none
    widget.image.channel_combos[2].setCurrentIndex(0)  # blue: none -> the red channel alone
    assert widget.image.sam_channels() == (widget.image.channel_combos[0].currentIndex(),)

    for index, name in enumerate(("microtubules", "protein", "nucleus", "er")):
        viewer.add_image(image[index], name=name)
    entries = [widget.image.layer_combo.itemText(i) for i in range(widget.image.layer_combo.count())]
    combined = [entry for entry in entries if "microtubules + protein + nucleus + er" in entry]
    assert combined, entries
    widget.image.layer_combo.setCurrentText(combined[0])
    assert [widget.image.channel_combos[0].itemText(i) for i in range(4)] == ["microtubules", "protein", "nucleus", "er"]
    embed(qtbot, widget)
    assert widget.session.image_shape == (96, 96)

    # export keeps the four channels, their names and the SAM mapping; exporting the same image
    # into the other split moves it there: never twice, never in both splits
    propose_square(widget, np.s_[30:50, 30:50])
    click(qtbot, widget.segment_panel.commit_button)
    widget.export_panel.dataset_edit.setText(str(tmp_path / "hpa.zarr"))
    for split in ("train", "val"):
        widget.export_panel.split_combo.setCurrentText(split)
        click(qtbot, widget.export_panel.button)
        wait_for_worker(qtbot, widget)
    assert "0 new, 1 updated" in widget.status.text()
    dataset = open_dataset(tmp_path / "hpa.zarr")
    assert dataset.channel_names == ["microtubules", "protein", "nucleus", "er"]
    assert dataset.sam_channels == [0, 3, 2]
    assert dataset.sample_ids("train") == [] and len(dataset.sample_ids("val")) == 1
    np.testing.assert_array_equal(dataset.image(dataset.sample_ids("val")[0]), image)
    # the annotator's embedding went along (same encoder as the dock's model)
    fingerprint = widget.session.model.encoder_fingerprint
    assert dataset.embedding(dataset.sample_ids("val")[0], fingerprint) is not None


def test_stack_is_annotated_slice_by_slice(annotator, qtbot):
    viewer, widget = annotator
    rng = np.random.default_rng(4)
    stack = np.stack([synthetic_cells(rng, shape=(80, 80), n_channels=1, n_cells=3)[0][0] for _ in range(6)])
    viewer.add_image(stack, name="frames")
    assert widget.image.layout_combo.currentText().startswith("slices")
    load_tiny_model(qtbot, widget)
    viewer.dims.set_current_step(0, 2)
    click(qtbot, widget.segment_panel.embed_button)
    wait_for_worker(qtbot, widget)
    propose_square(widget, np.s_[10:20, 10:20])
    click(qtbot, widget.segment_panel.commit_button)
    viewer.dims.set_current_step(0, 4)  # the next slice starts empty and gets its own embeddings
    wait_for_worker(qtbot, widget)
    assert widget._plane_index == (4,) and not viewer.layers[COMMITTED_LAYER].data.any()
    viewer.dims.set_current_step(0, 2)  # going back restores slice 2's objects
    wait_for_worker(qtbot, widget)
    assert viewer.layers[COMMITTED_LAYER].data[15, 15] == 1


@pytest.mark.parametrize(
    "data, message",
    [
        (np.full((100, 100), np.nan, np.float32), "NaN"),
        (np.zeros((40, 500), np.uint8), "64"),
        (np.zeros((2, 3, 5, 80, 80), np.uint8), "2D"),
    ],
)
def test_bad_images_get_a_plain_message(annotator, qtbot, data, message):
    viewer, widget = annotator
    viewer.add_image(data, name="bad")
    load_tiny_model(qtbot, widget)
    widget.compute_embeddings()
    wait_for_worker(qtbot, widget)
    assert message in widget.status.text()
    assert widget.session.image_shape is None


def test_no_image_and_unloadable_model_get_plain_messages(annotator, qtbot, tmp_path):
    viewer, widget = annotator
    assert not widget.segment_panel.embed_button.isEnabled()
    widget.model_panel.combo.setCurrentText(str(tmp_path / "missing.pt"))
    click(qtbot, widget.model_panel.load_button)
    wait_for_worker(qtbot, widget)
    assert "no file or folder" in widget.status.text()
    press(qtbot, viewer, Qt.Key.Key_S)
    assert "compute the embeddings first" in widget.status.text()


def _saved_variant(folder, part: str):
    """A model folder of random:tiny with the weights of ``part`` changed, as a fine-tune would."""
    sam = load_model("random:tiny").sam
    with torch.no_grad():
        for param in getattr(sam, part).parameters():
            param.add_(0.01)
    return save_model_folder(
        sam, folder, model_type="tiny", base_model="random:tiny", mode="decoder",
        dataset_fingerprint=None, metrics={}, config={},
    )


def test_model_switch_keeps_embeddings_only_when_the_encoder_is_unchanged(annotator, qtbot, tmp_path):
    viewer, widget = annotator
    image, _ = synthetic_cells(np.random.default_rng(5), shape=(96, 96), n_channels=1, n_cells=3)
    viewer.add_image(image[0], name="cells")
    embed(qtbot, widget)
    first = widget.session.model.encoder_fingerprint

    # a decoder fine-tune, chosen as its run folder: the embeddings stay
    _saved_variant(tmp_path / "run-1" / "model", "mask_decoder")
    widget.model_panel.combo.setCurrentText(str(tmp_path / "run-1"))
    click(qtbot, widget.model_panel.load_button)
    wait_for_worker(qtbot, widget)
    assert "embeddings were kept" in widget.status.text()
    assert widget.session.model.source == str(tmp_path / "run-1" / "model")
    assert widget.segment_panel.segment_button.isEnabled()

    # another image encoder: the embeddings are recomputed without asking, and the point layer the
    # user deleted meanwhile comes back to take the next clicks
    viewer.layers.remove(POINTS_LAYER)
    _saved_variant(tmp_path / "encoder-tuned", "image_encoder")
    widget.model_panel.combo.setCurrentText(str(tmp_path / "encoder-tuned"))
    click(qtbot, widget.model_panel.load_button)
    qtbot.waitUntil(lambda: "embeddings ready" in widget.status.text(), timeout=WORKER_TIMEOUT_MS)
    assert widget.session.model.encoder_fingerprint != first
    assert viewer.layers.selection.active is viewer.layers[POINTS_LAYER]


def test_a_checkpoint_of_another_architecture_is_refused_in_plain_words(annotator, qtbot, tmp_path):
    viewer, widget = annotator
    load_tiny_model(qtbot, widget)
    vit_t_keys = {"image_encoder.patch_embed.seq.0.c.weight": torch.zeros(1), "mask_decoder.x": torch.zeros(1)}
    safetensors.torch.save_file(vit_t_keys, str(tmp_path / "other.safetensors"))
    widget.model_panel.combo.setCurrentText(str(tmp_path / "other.safetensors"))
    click(qtbot, widget.model_panel.load_button)
    wait_for_worker(qtbot, widget)
    assert "other.safetensors" in widget.status.text()
    assert widget.session.model.source == "random:tiny"  # the loaded model stays


def test_prompts_outside_the_image_get_a_plain_message(annotator, qtbot):
    viewer, widget = annotator
    image, _ = synthetic_cells(np.random.default_rng(7), shape=(96, 96), n_channels=1, n_cells=3)
    viewer.add_image(image[0], name="cells")
    embed(qtbot, widget)
    viewer.layers[POINTS_LAYER].add([500, 500])
    click(qtbot, widget.segment_panel.segment_button)
    wait_for_worker(qtbot, widget)
    assert "outside the image" in widget.status.text()
    assert not viewer.layers[CURRENT_LAYER].data.any()


def test_plugin_manifest_widget_and_sample_data(make_napari_viewer):
    manifest = npe2.PluginManifest.from_distribution("napari-raysam")
    assert manifest == npe2.PluginManifest.from_file(Path(__file__).parents[1] / "napari.yaml")
    viewer = make_napari_viewer()
    dock, loading = viewer.window.add_plugin_dock_widget("napari-raysam", "SAM annotator")
    widget = loading.widget  # built at once: its module is imported already
    assert isinstance(widget, AnnotatorWidget) and annotator_for(viewer) is widget
    viewer.open_sample("napari-raysam", "hela")
    frames, masks = (layer for layer in viewer.layers if layer.name.startswith("HeLa"))
    assert frames.data.shape == (20, 700, 1100) and masks.data.max() > 10
    assert widget.image.layer_combo.currentText() == frames.name


def test_a_dock_that_cannot_load_says_what_to_do(make_napari_viewer, qtbot):
    dock = LoadingDock(make_napari_viewer(), "napari_raysam.no_such_module", "AnnotatorWidget")
    qtbot.waitUntil(lambda: "reinstall napari-raysam" in dock._message.text())
    assert "No module named 'napari_raysam.no_such_module'" in dock._message.text() and dock.widget is None


def run_napari_script(script: str) -> str:
    """Run ``script`` in a fresh Python, as a user's napari starts; it must exit cleanly. Returns its stdout."""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-3000:]
    return done.stdout


NAPARI_FIRST = """
import time

import napari
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QApplication


def wait_until(condition):
    while not condition():
        QApplication.processEvents()
        time.sleep(0.02)


viewer = napari.Viewer()  # its OpenGL context exists before napari imports the plugin, as in a user's napari
viewer.open_sample("napari-raysam", "hela")
turns, made = [0], []  # turns of napari's event loop; the turn each layer was made in
counter = QTimer(interval=0)
counter.timeout.connect(lambda: turns.__setitem__(0, turns[0] + 1))
counter.start()
viewer.layers.events.inserted.connect(lambda event: made.append(turns[0]))
_, annotator = viewer.window.add_plugin_dock_widget("napari-raysam", "SAM annotator")
assert annotator.widget is None, "the dock was built on napari's thread"  # its module loads in the background
wait_until(lambda: annotator.widget is not None)
print("turns at each layer", made)
from napari_raysam.widgets.annotator import POINTS_LAYER, SHORTCUTS  # imported by now

points = viewer.layers[POINTS_LAYER]  # made before the dock was built: its keys are the dock's
toggle = next(action for key, action in points.keymap.items() if str(key) == SHORTCUTS["toggle"])
toggle(points)
print("prompt mode after T", annotator.widget._prompt_mode)
_, finetune = viewer.window.add_plugin_dock_widget("napari-raysam", "Fine-tune")
wait_until(lambda: finetune.widget is not None)
wait_until(lambda: finetune.widget._task is None)  # its look for a running cluster
print("opened", [layer.name for layer in viewer.layers], finetune.widget.status.text())
viewer.close()
"""


def test_napari_survives_opening_the_docks_and_sample_from_its_menus():
    # a fresh process, napari first, as a user opens the docks: their modules (PyTorch) load in the
    # background. With Mesa's LLVM in the process (Xvfb, remote desktops), loading PyTorch's Triton
    # there killed napari with a segmentation fault, which no in-process test can see.
    stdout = run_napari_script(NAPARI_FIRST)
    assert "opened" in stdout and "HeLa" in stdout
    assert "starts with the first fine-tune" in stdout  # and none was started
    assert clusters.running_local_cluster() is None
    # the dock's five layers were made one per turn of napari's event loop (at once they held it ~1 s),
    # and the dock took them as its own
    turns = json.loads(stdout.split("turns at each layer ")[1].splitlines()[0])
    assert len(turns) == 5 and turns == sorted(set(turns)), turns
    assert f"prompt mode after T {NEGATIVE}" in stdout


CLOSED_WHILE_LOADING = """
import napari

viewer = napari.Viewer()
_, dock = viewer.window.add_plugin_dock_widget("napari-raysam", "SAM annotator")
assert dock.widget is None  # still loading PyTorch
viewer.close()
print("closed")
"""


def test_closing_napari_while_a_dock_loads_exits_cleanly():
    # the import ran in napari's thread pool at first: Python's teardown under it aborted the process
    assert "closed" in run_napari_script(CLOSED_WHILE_LOADING)


CLOSED_WHILE_EMBEDDING = """
import time

import napari
from qtpy.QtWidgets import QApplication

import napari_raysam.widgets.annotator  # the dock is built at once

viewer = napari.Viewer()
annotator = viewer.window.add_plugin_dock_widget("napari-raysam", "SAM annotator")[1].widget
viewer.open_sample("napari-raysam", "hela")
annotator.model_panel.combo.setCurrentText("random:vit_t")
annotator.model_panel.load_button.click()
while annotator.busy or annotator.model_source is None:
    QApplication.processEvents()
    time.sleep(0.02)
annotator.segment_panel.embed_button.click()  # ~2 s of vit_t's image encoder on a HeLa frame
for _ in range(10):
    QApplication.processEvents()
    time.sleep(0.02)
assert annotator.busy
viewer.close()
print("closed")
"""


def test_closing_napari_while_embeddings_are_computed_exits_cleanly():
    # Python's teardown under the running worker crashed the process (segmentation fault) after napari closed
    assert "closed" in run_napari_script(CLOSED_WHILE_EMBEDDING)


def test_triton_is_kept_out_only_where_llvm_is_loaded(monkeypatch, tmp_path):
    monkeypatch.delitem(sys.modules, "triton", raising=False)
    assert not keep_triton_out_if_llvm_is_loaded(tmp_path / "no such file")  # no /proc (macOS, Windows)
    maps = tmp_path / "maps"
    maps.write_text("7f00 r-xp 00000000 08:01 1 /usr/lib/x86_64-linux-gnu/libstdc++.so.6\n")
    assert not keep_triton_out_if_llvm_is_loaded(maps)
    assert "triton" not in sys.modules
    maps.write_text("7f00 r-xp 00000000 08:01 2 /usr/lib/x86_64-linux-gnu/libLLVM-15.so.1\n")
    assert keep_triton_out_if_llvm_is_loaded(maps)
    with pytest.raises(ImportError):
        import triton  # noqa: F401


def test_dock_screenshot_is_drawn(annotator, qtbot, tmp_path):
    viewer, widget = annotator
    image, _ = synthetic_cells(np.random.default_rng(6), shape=(128, 128), n_channels=1, n_cells=5)
    viewer.add_image(image[0], name="cells")
    embed(qtbot, widget)
    path = tmp_path / "annotator.png"
    screenshot = viewer.screenshot(str(path), canvas_only=False)
    assert path.is_file()
    # the dock is laid out at a readable size and every button is on screen
    assert widget.width() >= 250 and widget.isVisible()
    for button in (widget.segment_panel.segment_button, widget.segment_panel.commit_button, widget.export_panel.button):
        assert button.isVisible() and button.width() >= 40 and button.height() >= 15
    assert screenshot.shape[1] > widget.width()


def test_a_short_dock_scrolls_its_boxes_and_keeps_the_status_line_in_view(annotator, qtbot):
    """On a laptop's screen, with the fine-tune dock under it, the dock is short: its boxes scroll
    instead of pushing napari's window past the screen, and the status line, where every message
    and error appears, stays whole in view. With room, nothing scrolls."""
    viewer, widget = annotator
    window, status, scroll_bar = viewer.window._qt_window, widget.status, widget.scroll_area.verticalScrollBar()
    widget._say("a message long enough to wrap onto a second line of the status line, as the errors "
                "do, which tell the user in plain words what to do next")
    window.resize(1200, 440)  # napari's own layer list and controls keep it ~600 px tall
    qtbot.waitUntil(lambda: scroll_bar.maximum() > 0)
    assert window.height() < 640  # the dock's boxes alone asked for 630 px: the window grew past a laptop's screen
    qtbot.waitUntil(lambda: wholly_in_view(status))
    window.resize(1200, 1100)
    qtbot.waitUntil(lambda: scroll_bar.maximum() == 0)
    assert status.y() < widget.scroll_area.geometry().bottom() + 40  # right under the boxes, not at the dock's far end


def test_closing_the_image_keeps_its_objects_and_stops_prompting(annotator, qtbot):
    viewer, widget = annotator
    image, _ = synthetic_cells(np.random.default_rng(8), shape=(96, 96), n_channels=1, n_cells=3)
    layer = viewer.add_image(image[0], name="cells")
    embed(qtbot, widget)
    propose_square(widget, np.s_[5:15, 5:15])
    click(qtbot, widget.segment_panel.commit_button)
    key = widget._plane_key
    viewer.layers.remove(layer)
    assert not widget.segment_panel.segment_button.isEnabled() and not widget.export_panel.button.isEnabled()
    assert widget.store.load(key, (96, 96))[10, 10] == 1
    widget.export_panel.dataset_edit.setText("out.zarr")
    widget.export()
    assert "nothing to export" in widget.status.text()


def test_a_model_with_an_instance_decoder_segments_automatically_with_it(annotator, qtbot, decoder_model):
    viewer, widget = annotator
    image, _ = synthetic_cells(np.random.default_rng(9), shape=(96, 96), n_channels=1, n_cells=3)
    viewer.add_image(image[0], name="cells")
    widget.model_panel.combo.setCurrentText(decoder_model)
    click(qtbot, widget.model_panel.load_button)
    wait_for_worker(qtbot, widget)
    assert "instance decoder" in widget.model_panel.label.text() and not widget.segment_panel.grid_spin.isEnabled()
    spins = widget.segment_panel.automatic_settings.spins
    assert spins["center_distance_threshold"].isEnabled() and not spins["pred_iou_thresh"].isEnabled()
    click(qtbot, widget.segment_panel.embed_button)
    wait_for_worker(qtbot, widget)
    click(qtbot, widget.segment_panel.automatic_button)
    wait_for_worker(qtbot, widget)
    assert viewer.layers[AUTOMATIC_LAYER].data.shape == (96, 96)
    assert "automatic segmentation:" in widget.status.text()


def test_batched_prompts_segment_many_objects_committed_as_one_step(annotator, qtbot, monkeypatch):
    viewer, widget = annotator
    image, truth = synthetic_cells(np.random.default_rng(4), shape=(128, 128), n_channels=1, n_cells=5)
    viewer.add_image(image[0], name="cells")
    embed(qtbot, widget)

    def box_or_disk(points=None, point_labels=None, box=None):
        """A stand-in SAM (random weights propose nothing reliable): the box filled, or a disk at the positive point."""
        mask = np.zeros((128, 128), bool)
        if box is not None:
            y0, x0, y1, x1 = np.rint(box).astype(int)
            mask[y0:y1 + 1, x0:x1 + 1] = True
        else:
            y, x = np.asarray(points)[np.asarray(point_labels) == 1][0]
            yy, xx = np.ogrid[:128, :128]
            mask[(yy - y) ** 2 + (xx - x) ** 2 <= 36] = True
        return mask

    monkeypatch.setattr(widget.session, "segment", box_or_disk)
    boxes = viewer.layers[BOXES_LAYER]
    for object_id in (1, 2):
        ys, xs = np.nonzero(truth == object_id)
        boxes.add_rectangles(np.array([[ys.min(), xs.min()], [ys.max(), xs.max()]]))
    viewer.layers[POINTS_LAYER].add(np.argwhere(truth == 3)[0])
    click(qtbot, widget.segment_panel.segment_button)
    assert "tick Batched" in widget.status.text()  # points and two boxes: which object is which?
    assert not viewer.layers[CURRENT_LAYER].data.any()

    widget.segment_panel.batched_check.setChecked(True)
    click(qtbot, widget.segment_panel.segment_button)
    wait_for_worker(qtbot, widget)  # several objects are segmented in the background
    proposed = shown_proposal(viewer, "cells")
    assert set(np.unique(proposed)) == {0, 1, 2, 3} and widget.status.text().startswith("proposed 3 objects")
    for object_id in (1, 2):  # each box filled where it was drawn
        ys, xs = np.nonzero(truth == object_id)
        assert (proposed[ys.min():ys.max() + 1, xs.min():xs.max() + 1] > 0).all()
    shown = viewer.layers[CURRENT_LAYER].data
    assert shown.shape == tuple(np.ptp(np.argwhere(proposed), axis=0) + 1)  # the layer holds only their bounding box
    viewer.screenshot("/tmp/napari_raysam_batched.png", canvas_only=False)  # looked at by the engineer
    press(qtbot, viewer, Qt.Key.Key_C)
    committed = viewer.layers[COMMITTED_LAYER].data
    assert set(np.unique(committed)) == {0, 1, 2, 3} and widget.status.text() == "committed 3 objects (1–3)"
    np.testing.assert_array_equal(committed > 0, proposed > 0)  # where they were shown
    assert len(boxes.data) == 0 and len(viewer.layers[POINTS_LAYER].data) == 0
    press(qtbot, viewer, Qt.Key.Key_U)  # one undo takes back the batch
    assert not viewer.layers[COMMITTED_LAYER].data.any() and widget.status.text() == "undone: 3 objects removed"


def test_a_plane_is_read_hashed_and_restored_off_the_event_loop_and_locked_meanwhile(annotator, qtbot, monkeypatch):
    viewer, widget = annotator
    stack = np.stack([synthetic_cells(np.random.default_rng(k), shape=(96, 96), n_channels=1, n_cells=3)[0][0] for k in range(6)])
    viewer.add_image(stack, name="frames")
    embed(qtbot, widget)
    propose_square(widget, np.s_[10:20, 10:20])
    click(qtbot, widget.segment_panel.commit_button)
    [start] = widget._plane_index
    threads, release = [], threading.Event()
    prepare = annotator_module.prepare_plane

    def slow_prepare(*args):
        threads.append(threading.current_thread())
        release.wait(timeout=30)  # a 10,000 x 10,000 plane: seconds of reading, scaling and hashing
        return prepare(*args)

    monkeypatch.setattr(annotator_module, "prepare_plane", slow_prepare)
    viewer.dims.set_point(0, start + 2)  # another slice
    qtbot.waitUntil(lambda: bool(threads))
    assert threads[0] is not threading.main_thread()
    # the previous plane's objects are still shown; nobody may paint them while the new plane is read
    committed = viewer.layers[COMMITTED_LAYER]
    assert committed.data[15, 15] == 1 and not committed.editable
    release.set()
    wait_for_worker(qtbot, widget)
    assert widget._plane_index == (start + 2,) and committed.editable and not committed.data.any()
    viewer.dims.set_point(0, start)  # back: the first slice's object is restored, also read in the worker
    wait_for_worker(qtbot, widget)
    assert committed.data[15, 15] == 1 and widget.status.text().startswith("restored 1 autosaved objects;")
    assert len(threads) == 2 and threads[1] is not threading.main_thread()


def test_automatic_segmentation_uses_the_settings_shown(annotator, qtbot, monkeypatch):
    viewer, widget = annotator
    image, _ = synthetic_cells(np.random.default_rng(5), shape=(96, 96), n_channels=1, n_cells=3)
    viewer.add_image(image[0], name="cells")
    embed(qtbot, widget)
    settings = widget.segment_panel.automatic_settings
    assert settings.button.isVisible() and not settings.form.isVisible()  # in a popup, until asked for
    settings.button.menu().popup(settings.button.mapToGlobal(settings.button.rect().bottomLeft()))
    qtbot.waitUntil(settings.form.isVisible)
    spins = settings.spins
    assert spins["pred_iou_thresh"].isEnabled() and not spins["boundary_distance_threshold"].isEnabled()  # a point grid model
    spins["pred_iou_thresh"].setValue(0.5)
    spins["min_object_size"].setValue(40)
    widget.segment_panel.grid_spin.setValue(6)
    calls = []
    monkeypatch.setattr(widget.session, "automatic_segmentation", lambda progress, **kwargs: calls.append(kwargs) or np.zeros((96, 96), np.uint32))
    settings.form.grab().save("/tmp/napari_raysam_automatic_settings.png")  # the popup, looked at by the engineer
    viewer.screenshot("/tmp/napari_raysam_automatic_dock.png", canvas_only=False)
    settings.button.menu().hide()
    click(qtbot, widget.segment_panel.automatic_button)
    wait_for_worker(qtbot, widget)
    [used] = calls
    assert used["points_per_side"] == 6 and used["pred_iou_thresh"] == 0.5 and used["min_object_size"] == 40
    assert used["stability_score_thresh"] == 0.95  # micro-sam's default, untouched


def test_a_channel_last_image_is_split_into_channel_layers_and_annotated_as_one(annotator, qtbot):
    viewer, widget = annotator
    image, _ = synthetic_cells(np.random.default_rng(6), shape=(96, 112), n_channels=5, n_cells=3)
    channel_last = np.moveaxis(image, 0, -1)  # (H, W, C), as many TIFF writers store it
    viewer.add_image(channel_last, name="tiff", scale=(0.5, 0.5, 1))
    assert widget.image.split_button.isVisible() and "channels last" in widget.status.text()
    click(qtbot, widget.image.split_button)
    assert widget.image.layer_combo.currentText() == "channel layers: " + " + ".join(f"tiff [{k}]" for k in range(5))
    assert "tiff" not in viewer.layers and viewer.dims.ndim == 2 and not widget.image.split_button.isVisible()
    assert tuple(viewer.layers["tiff [0]"].scale) == (0.5, 0.5)
    assert [widget.image.channel_combos[0].itemText(k) for k in range(5)] == [f"tiff [{k}]" for k in range(5)]
    embed(qtbot, widget)
    assert widget.session.image_shape == (96, 112)
    np.testing.assert_array_equal(widget._channels.plane(()), image)
    viewer.screenshot("/tmp/napari_raysam_split.png", canvas_only=False)  # looked at by the engineer
