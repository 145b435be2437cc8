"""Going through a series in the annotator dock (real napari, Xvfb): previous / next, the count, the next image ready."""

from __future__ import annotations

import os
import threading

import numpy as np
from qtpy.QtCore import Qt

from napari_raysam.annotator.image_source import sam_rgb
from napari_raysam.widgets import annotator_series
from napari_raysam.widgets.annotator import COMMITTED_LAYER, POINTS_LAYER, AnnotatorWidget
from synthetic import synthetic_cells
from test_annotator_widget import WORKER_TIMEOUT_MS, annotator, click, embed, press, propose_square, wait_for_worker  # noqa: F401 (annotator: the fixture)
from test_hpa import write_field


def wait_until_idle(qtbot, widget: AnnotatorWidget) -> None:
    """Until the dock and its series row have nothing running (the next image is ready, the series checked)."""
    qtbot.waitUntil(lambda: widget._worker is None and widget.series._worker is None, timeout=WORKER_TIMEOUT_MS)


def record_status(monkeypatch, widget: AnnotatorWidget) -> list[str]:
    """Every status line the dock shows from now on (a cached image loads too fast to see it in the label)."""
    said: list[str] = []
    set_text = widget.status.setText
    monkeypatch.setattr(widget.status, "setText", lambda text: (said.append(text), set_text(text)))
    return said


def commit_square(qtbot, widget: AnnotatorWidget, viewer) -> None:
    propose_square(widget, np.s_[20:30, 20:30])
    click(qtbot, widget.segment_panel.commit_button)


def test_a_stack_is_gone_through_with_buttons_and_keys(annotator, qtbot, monkeypatch):
    viewer, widget = annotator
    said = record_status(monkeypatch, widget)
    rng = np.random.default_rng(0)
    stack = np.stack([synthetic_cells(rng, shape=(96, 96), n_channels=1, n_cells=3)[0][0] for _ in range(3)])
    viewer.add_image(stack, name="frames")
    series = widget.series
    assert series.label.text() == "0 of 1 annotated, checking…"  # three planes: guessed to be channels
    widget.image.layout_combo.setCurrentIndex(0)  # the user says: slices
    assert series.label.text() == "image 2 of 3 · 0 of 3 annotated, checking…"  # napari opens a stack in its middle
    click(qtbot, series.previous_button)
    assert not series.previous_button.isEnabled() and series.next_button.isEnabled()
    embed(qtbot, widget)
    commit_square(qtbot, widget, viewer)
    wait_until_idle(qtbot, widget)
    assert series.label.text() == "image 1 of 3 · 1 of 3 annotated"
    # while the user worked on image 1, image 2's embeddings were computed in the background
    assert widget.session.is_cached(sam_rgb(stack[1], (0,)))

    said.clear()
    press(qtbot, viewer, Qt.Key.Key_N)
    wait_for_worker(qtbot, widget)
    assert said[:2] == ["reading the image…", "loading cached embeddings…"]
    assert widget._plane_index == (1,) and viewer.dims.current_step[0] == 1
    assert not viewer.layers[COMMITTED_LAYER].data.any()
    assert series.label.text() == "image 2 of 3 · 1 of 3 annotated" and series.previous_button.isEnabled()
    viewer.layers[POINTS_LAYER].add([48, 48])
    click(qtbot, widget.segment_panel.segment_button)
    wait_for_worker(qtbot, widget)
    assert "proposed object" in widget.status.text()

    click(qtbot, series.previous_button)  # back: image 1's objects are restored
    wait_for_worker(qtbot, widget)
    assert widget._plane_index == (0,) and viewer.layers[COMMITTED_LAYER].data[25, 25] == 1
    assert series.label.text() == "image 1 of 3 · 1 of 3 annotated"

    wait_until_idle(qtbot, widget)
    press(qtbot, viewer, Qt.Key.Key_N)
    wait_for_worker(qtbot, widget)
    wait_until_idle(qtbot, widget)
    said.clear()
    press(qtbot, viewer, Qt.Key.Key_N)  # image 3: the last one, made ready while image 2 was shown
    wait_for_worker(qtbot, widget)
    assert said[:2] == ["reading the image…", "loading cached embeddings…"]
    assert widget._plane_index == (2,) and not series.next_button.isEnabled()
    press(qtbot, viewer, Qt.Key.Key_N)
    assert "this is the last of the series" in widget.status.text() and widget._plane_index == (2,)
    press(qtbot, viewer, Qt.Key.Key_N, Qt.KeyboardModifier.ShiftModifier)
    wait_for_worker(qtbot, widget)
    assert widget._plane_index == (1,)


def test_an_hpa_folder_series_counts_what_an_earlier_session_annotated(make_napari_viewer, qtbot, tmp_path):
    for k in range(3):
        write_field(tmp_path / "plate", f"well_{k}", seed=k)
    cache = tmp_path / "cache"
    for attempt in range(2):
        viewer = make_napari_viewer(show=True)
        widget = AnnotatorWidget(viewer, cache_dir=cache)
        viewer.window.add_dock_widget(widget, name="SAM annotator")
        viewer.open(str(tmp_path / "plate"), plugin="napari-raysam")
        embed(qtbot, widget)
        if attempt == 0:
            click(qtbot, widget.series.next_button)  # field 3 of 3 (napari opens a stack in its middle)
            wait_for_worker(qtbot, widget)
            commit_square(qtbot, widget, viewer)
            assert widget._plane_index == (2,)
        wait_until_idle(qtbot, widget)
        # reopened, the folder's count includes field 3, annotated before the reopening
        assert widget.series.label.text() == f"image {3 - attempt} of 3 · 1 of 3 annotated"
        if attempt == 1:
            click(qtbot, widget.series.next_button)
            wait_for_worker(qtbot, widget)
            assert viewer.layers[COMMITTED_LAYER].data[25, 25] == 1
            path = "/tmp/napari_raysam_series_dock.png"
            viewer.screenshot(path, canvas_only=False)
            assert widget.series.isVisible() and widget.series.next_button.width() >= 40
        viewer.close()


def test_the_series_works_ahead_at_the_lowest_cpu_priority(annotator, qtbot, monkeypatch):
    """The next image's embeddings (and the ranking) yield the cores to what the user waits for: the prompt
    on the image shown is answered on napari's threads at normal priority."""
    viewer, widget = annotator
    niceness = []  # of the thread that makes the next image ready
    make_ready = annotator_series.prepare_plane
    monkeypatch.setattr(annotator_series, "prepare_plane", lambda *args: (
        niceness.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id())), make_ready(*args))[1])
    rng = np.random.default_rng(2)
    stack = np.stack([synthetic_cells(rng, shape=(96, 96), n_channels=1, n_cells=3)[0][0] for _ in range(3)])
    viewer.add_image(stack, name="frames")
    widget.image.layout_combo.setCurrentIndex(0)  # slices
    embed(qtbot, widget)
    wait_until_idle(qtbot, widget)
    assert widget.session.is_cached(sam_rgb(stack[2], (0,)))  # made ready behind
    assert niceness and set(niceness) == {19}
    answered_at = []
    monkeypatch.setattr(widget.session, "segment_objects", lambda *args, real=widget.session.segment_objects: (
        answered_at.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id())), real(*args))[1])
    viewer.layers[POINTS_LAYER].add([48, 48])
    click(qtbot, widget.segment_panel.segment_button)
    wait_for_worker(qtbot, widget)
    assert answered_at == [0] and os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == 0
