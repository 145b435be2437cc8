"""The annotation workday's GUI figures (issue 10): event-loop stalls and the next image's first answer.

Real napari (Xvfb when there is no display) with the docked ``AnnotatorWidget``; a ``QTimer``
heartbeat every 10 ms on napari's event loop, and the longest gap between two beats is the
longest stall; each phase also lists Python's full garbage collections that began in it (they hold
the GIL for as long as they walk the process's objects), and the run lists all of them. After
opening the dock from napari's Plugins menu (its module loading in the background included), three phases:

1. **large image**: a 10,000 x 10,000 (``--side``) 4-channel uint16 image is added, first to
   napari alone (before the dock exists, after a small image warmed napari up: napari's own
   cost), then with the dock open (``add_image`` timed too, the dock's handlers included); loading
   the model, *Compute embeddings* until the dock has read, scaled and hashed the plane and the image encoder
   starts (the first progress report of the tiled embedding), the rest of the embedding, and one
   point prompt answered (the proposal is shown cropped to its bounding box: its shape is printed,
   as large as the image when the random model's mask spreads over it), then one whose answer is
   replaced by a cell-sized 60 x 60 square (the display of what a trained model answers), and its
   Commit (written into the image-sized committed labels, shown, autosaved), ``--commits`` times at
   different places; ``random:tiny`` there, since only
   the event loop is measured and a 10,000-pixel vit_t embedding takes many minutes on 2 cores;
2. **series**: the 20 real HeLa frames (700 x 1100) as one stack, ``random:vit_t``: the first
   frame is embedded, the series row computes the next one's embeddings in the background, then
   *Next* (N) until the next frame is ready and a point prompt has been answered, ``--steps`` times:
   the longest stall and the time from *Next* to the first answered prompt (goal <= 0.3 s); before
   that, ``--prompts`` prompts on the first frame at once after it is embedded, answered while the
   series row reads ahead and ranks the other frames behind them;
3. **automatic segmentation** of the last frame shown (point grid, ``--grid`` points per side).

    xvfb-run -a .venv/bin/python bench/series_stalls.py [--side 10000] [--steps 3] [--grid 16]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import machine  # noqa: E402

GOALS_MS = {"stall": 100.0, "next_to_first_answer": 300.0}


class FullCollections:
    """Python's full (generation 2) garbage collections, timed by ``gc.callbacks``: each walks every
    tracked object holding the GIL, so napari's event loop waits for it too."""

    def __init__(self) -> None:
        self.spans: list[tuple[float, float]] = []  # (start, end), perf_counter seconds
        self._start = 0.0
        gc.callbacks.append(self._record)

    def _record(self, phase: str, info: dict) -> None:
        if info["generation"] != 2:
            return
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.spans.append((self._start, time.perf_counter()))

    def within(self, start: float, end: float) -> list[float]:
        """The durations (ms) of the full collections that began between ``start`` and ``end``."""
        return [round((e - s) * 1000, 1) for s, e in self.spans if start <= s <= end]


class EventLoop:
    """napari's event loop with a 10 ms heartbeat: run it until a condition holds, and read the
    longest gap between beats in that time (and the full garbage collections in it)."""

    def __init__(self) -> None:
        from qtpy.QtCore import Qt, QTimer

        self.collections = FullCollections()
        self.beats: list[float] = []
        self._heartbeat = QTimer(interval=10)
        self._heartbeat.setTimerType(Qt.TimerType.PreciseTimer)
        self._heartbeat.timeout.connect(lambda: self.beats.append(time.perf_counter()))
        self._heartbeat.start()

    def run_until(self, action: Callable[[], None], done: Callable[[], bool], limit_s: float = 900, tail_s: float = 0.3) -> dict:
        """Queue ``action`` 100 ms in, run the loop until ``done()`` (polled every 5 ms) and ``tail_s``
        more (a stall ending at ``done`` is closed by the next beat); the window's longest heartbeat
        gap and how long it took from ``action`` to ``done``."""
        from qtpy.QtCore import QEventLoop, QTimer

        loop, times = QEventLoop(), {}

        def go() -> None:
            times["action"] = time.perf_counter()
            action()

        def poll() -> None:
            now = time.perf_counter()
            if "action" in times and "done" not in times and done():
                times["done"] = now
            if "done" in times and now - times["done"] >= tail_s:
                loop.quit()

        poller = QTimer(interval=5)
        poller.timeout.connect(poll)
        poller.start()
        QTimer.singleShot(100, go)
        QTimer.singleShot(int(limit_s * 1000), loop.quit)
        start = time.perf_counter()
        loop.exec()
        poller.stop()
        end = time.perf_counter()
        beats = np.array([b for b in self.beats if start <= b <= end])
        gaps = np.diff(beats) * 1000 if len(beats) > 1 else np.array([0.0])
        return {"max_stall_ms": round(float(gaps.max()), 1), "gaps_over_100ms": int((gaps > 100).sum()),
                "longest_stalls_ms": [round(float(gap), 1) for gap in sorted(gaps, reverse=True)[:5]],
                "action_to_done_s": round(times["done"] - times["action"], 3) if "done" in times else None,
                "timed_out": "done" not in times, "full_gc_ms": self.collections.within(start, end)}


def proposal_shown(widget) -> bool:
    """Whether the dock's last Segment is done and its proposal shown: while it runs the status line
    says "segmenting…", after it "proposed …" (the layer holds only the objects' bounding box)."""
    return widget._worker is None and widget.status.text().startswith("proposed")


def large_image_without_the_dock(viewer, loop: EventLoop, image: np.ndarray) -> dict:
    """napari's own cost of opening ``image``, before the dock exists (after a small image warmed napari up)."""
    loop.run_until(lambda: viewer.add_image(np.zeros((64, 64), np.uint16), name="warm-up"), lambda: True)
    viewer.layers.clear()
    figures = loop.run_until(lambda: viewer.add_image(image, name="large"), lambda: "large" in viewer.layers)
    viewer.layers.clear()
    return figures


def large_image(viewer, widget, loop: EventLoop, image: np.ndarray, commits: int) -> dict:
    from napari_raysam.widgets.annotator import CURRENT_LAYER, POINTS_LAYER

    figures: dict = {}

    def add() -> None:
        begin = time.perf_counter()
        viewer.add_image(image, name="large")
        figures["napari_add_image_s"] = round(time.perf_counter() - begin, 2)  # the dock's handlers included

    figures["open"] = loop.run_until(add, lambda: widget.image.layer_combo.currentText() == "large")
    widget.model_panel.combo.setCurrentText("random:tiny")
    figures["load_model"] = loop.run_until(widget.load_model, lambda: widget._worker is None)
    progress: list[tuple[int, int]] = []
    widget._progress.changed.connect(lambda done, total: progress.append((done, total)))
    # the encoder starts (micro-sam's pbar_init for the tiles) once the plane is read, scaled and hashed
    figures["compute_embeddings_until_the_encoder_starts"] = loop.run_until(
        widget.compute_embeddings, lambda: any(total > 1 for _, total in progress)
    )
    figures["compute_embeddings_to_the_end"] = loop.run_until(lambda: None, lambda: widget._worker is None)
    side = image.shape[-1]
    viewer.layers[POINTS_LAYER].data = [[side / 2, side / 2]]
    figures["point_prompt_answered"] = loop.run_until(
        widget.segment, lambda: proposal_shown(widget)
    )
    figures["proposal_shape"] = list(viewer.layers[CURRENT_LAYER].data.shape)
    # the display of a cell-sized answer (what a trained model gives), the model's answer replaced
    # by a 60 x 60 square at the point: the crop, not the image, is what napari then copies and draws
    real = widget.session.segment_objects
    figures["cell_sized_answer_shown"], figures["commits_of_cell_sized_objects"] = [], []
    for k in range(commits):
        corner = side // 2 + 100 * k - 30  # a new place each time, inside the image

        def cell_sized(objects, progress=None, corner=corner):
            labels = np.zeros((side, side), np.uint8)
            labels[corner:corner + 60, corner:corner + 60] = 1
            return labels

        widget.session.segment_objects = cell_sized
        viewer.layers[POINTS_LAYER].data = [[corner + 30, corner + 30]]
        figures["cell_sized_answer_shown"].append(loop.run_until(widget.segment, lambda: proposal_shown(widget)))
        figures["cell_sized_proposal_shape"] = list(viewer.layers[CURRENT_LAYER].data.shape)
        # Commit writes it into the image-sized committed labels, redraws them and autosaves them
        figures["commits_of_cell_sized_objects"].append(loop.run_until(
            widget.commit, lambda: widget.status.text().startswith("committed")
        ))
    widget.session.segment_objects = real
    viewer.layers.clear()
    return figures


def prompts_behind(widget, loop: EventLoop, labels: np.ndarray, count: int) -> dict:
    """``count`` point prompts on the first frame, one object's centre each, at once after it is embedded,
    while the series row reads the next frame ahead and ranks the others (its background worker):
    the time from each prompt to its answer on screen, and whether the row was working then."""
    from napari_raysam.widgets.annotator import POINTS_LAYER

    ids = np.unique(labels)[1:]
    answers, behind, stalls = [], [], []
    for k in range(count):
        centre = np.argwhere(labels == ids[k * len(ids) // count]).mean(axis=0)

        def prompt() -> None:
            behind.append(widget.series._worker is not None)
            widget.viewer.layers[POINTS_LAYER].data = centre[None]
            widget.segment()

        step = loop.run_until(
            prompt, lambda: proposal_shown(widget)
        )
        answers.append(step["action_to_done_s"])
        stalls.append(step["max_stall_ms"])
        widget.clear_prompts()
    working = [a for a, b in zip(answers, behind) if b]
    return {"answers_s": answers, "row_working_behind": behind, "max_stall_ms": max(stalls),
            "median_answer_while_working_s": float(np.median(working)) if working else None}


def series(viewer, widget, loop: EventLoop, steps: int, grid: int, prompts: int) -> dict:
    from napari_raysam.demo import hela_frames
    from napari_raysam.widgets.annotator import POINTS_LAYER

    frames, labels = hela_frames()
    viewer.add_image(frames, name="HeLa series")
    widget.image.layout_combo.setCurrentIndex(0)  # slices
    widget.model_panel.combo.setCurrentText("random:vit_t")
    figures: dict = {"load_model": loop.run_until(widget.load_model, lambda: widget._worker is None)}
    viewer.dims.set_point(0, 0)
    figures["compute_embeddings"] = loop.run_until(widget.compute_embeddings, lambda: widget._worker is None)
    figures["prompts_while_the_row_works_behind"] = prompts_behind(widget, loop, labels[0], prompts)
    figures["next"] = []
    for _ in range(steps):
        loop.run_until(lambda: None, lambda: widget._worker is None and widget.series._worker is None)  # next one ready
        z = widget._plane_index[0] + 1
        centre = np.argwhere(labels[z] == np.unique(labels[z])[1]).mean(axis=0)

        asked: list[float] = []  # when the prompt was sent

        def answered() -> bool:
            """Once the frame is shown, prompt it once; true when the answer is on screen."""
            if widget._worker is not None or widget._plane_index != (z,):
                return False
            if not asked:
                widget.viewer.layers[POINTS_LAYER].data = centre[None]
                widget.segment()  # in the dock's worker
                asked.append(time.perf_counter())
                return False
            return proposal_shown(widget)

        pressed: list[float] = []
        step = loop.run_until(lambda: (pressed.append(time.perf_counter()), widget.series.next()), answered)
        # the frame is shown and prompted (next_to_prompt_s), then the prompt is answered
        step["next_to_prompt_s"] = round(asked[0] - pressed[0], 3)
        figures["next"].append({"to": z, **step})
        widget.clear_prompts()
    widget.segment_panel.grid_spin.setValue(grid)
    figures["automatic_segmentation"] = loop.run_until(widget.automatic_segmentation, lambda: widget._worker is None)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=10_000, help="side of the large 4-channel image (0: skip that phase)")
    parser.add_argument("--steps", type=int, default=3, help="how many times Next is pressed (0: skip the series phase)")
    parser.add_argument("--grid", type=int, default=16, help="automatic segmentation's points per side")
    parser.add_argument("--commits", type=int, default=5, help="cell-sized objects shown and committed on the large image")
    parser.add_argument("--prompts", type=int, default=12, help="prompts on the first frame while the row works behind")
    args = parser.parse_args()
    os.environ.setdefault("NAPARI_RAYSAM_HOME", tempfile.mkdtemp(prefix="series-stalls-"))
    import napari

    print(machine(), flush=True)
    viewer = napari.Viewer(show=True)
    loop = EventLoop()
    result: dict = {}
    if args.side:
        image = np.random.default_rng(0).integers(0, 4000, (4, args.side, args.side), dtype=np.uint16)
        result["large_image_without_the_dock"] = large_image_without_the_dock(viewer, loop, image)
    docks: list = []

    def open_the_dock() -> None:  # as napari's Plugins menu opens it (its module loads in the background)
        docks.append(viewer.window.add_plugin_dock_widget("napari-raysam", "SAM annotator")[1])

    result["open_the_dock"] = loop.run_until(open_the_dock, lambda: bool(docks) and docks[0].widget is not None)
    widget = docks[0].widget
    if args.side:
        result["large_image"] = large_image(viewer, widget, loop, image, args.commits)
    print(json.dumps(result, indent=1), flush=True)
    if args.steps:
        result["series"] = series(viewer, widget, loop, args.steps, args.grid, args.prompts)
    result["goals_ms"] = GOALS_MS
    result["full_gc_ms_whole_run"] = loop.collections.within(0, time.perf_counter())
    result["objects_tracked_at_the_end"] = len(gc.get_objects())
    print(json.dumps(result, indent=1), flush=True)
    viewer.close()


if __name__ == "__main__":
    main()
