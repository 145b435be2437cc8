"""The annotator's latencies (issue 3): prompt -> mask, cached reopen, GUI stalls, export.

Real HeLa frames (``napari_raysam.demo.hela_frames``, 700 x 1100) made 1024 x 1024: columns
centre-cropped, rows padded at the bottom with the frame's median (background) intensity and
label 0. Random vit_t weights (``random:vit_t``, MobileSAM): latency does not depend on the
weights' values. CPU only. Each figure sits beside what micro-sam does on the same input.

1. prompt -> mask after the embeddings, ``SamSession.segment`` vs micro-sam's
   ``segment_from_points`` / ``segment_from_box`` on the same predictor, embeddings and
   prompts (half one positive point at an object's centre, half the object's box, from the
   reference masks), alternating ours / micro-sam per prompt after a warm-up;
2. reopening a cached 1024 x 1024 image: a fresh ``SamSession`` (model loaded, not timed)
   reads the embeddings from the cache and ``AnnotationStore`` its autosaved labels, vs
   micro-sam's ``precompute_image_embeddings`` reading the same zarr cache;
3. the longest stall of napari's event loop (a QTimer heartbeat every 10 ms) while the docked
   ``AnnotatorWidget`` computes embeddings (fresh cache) and then runs automatic segmentation;
4. export of 20 images with labels into a fresh dataset (``write_samples``) vs writing the
   same pairs as TIFF files with tifffile.

    .venv/bin/python bench/annotator.py [--prompts 100] [--reopens 10] [--grid 32] [--no-gui]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import shutil
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import tifffile
from micro_sam.prompt_based_segmentation import segment_from_box, segment_from_points
from micro_sam.util import get_centers_and_bounding_boxes, precompute_image_embeddings

from backend.dataset import SampleInput, write_samples
from common import machine
from napari_raysam.annotator.annotations import AnnotationStore
from napari_raysam.demo import hela_frames
from napari_raysam.annotator.image_source import content_key, sam_rgb
from napari_raysam.annotator.session import SamSession

MODEL = "random:vit_t"
SIDE = 1024
WARMUP = 5
HEARTBEAT_MS = 10
GOALS = {"prompt_p95_ms": 100.0, "reopen_s": 0.2, "stall_ms": 100.0, "export_s": 5.0}


def square(frame: np.ndarray, fill: float) -> np.ndarray:
    """``(H, W)`` -> ``(SIDE, SIDE)``: longer axes centre-cropped, shorter ones padded at the end with ``fill``."""
    out = np.full((SIDE, SIDE), fill, frame.dtype)
    crop = tuple(slice((n - SIDE) // 2, (n - SIDE) // 2 + SIDE) if n > SIDE else slice(0, n) for n in frame.shape)
    part = frame[crop]
    out[: part.shape[0], : part.shape[1]] = part
    return out


def percentiles_ms(seconds: list[float]) -> dict[str, float]:
    values = np.asarray(seconds) * 1000
    return {"p50_ms": float(np.percentile(values, 50)), "p95_ms": float(np.percentile(values, 95)),
            "max_ms": float(values.max()), "n": len(values)}


def timed(call: Callable[[], object]) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


@contextlib.contextmanager
def usage(summary: dict, name: str):
    """Record in ``summary[name]`` the 1-min load average before and after, and the cores this process used:
    on this shared 2-core machine, other processes slow the figures down (2 torch threads on 1 free core)."""
    load, wall, cpu = os.getloadavg()[0], time.perf_counter(), time.process_time()
    yield
    summary[name] = {"load_before": round(load, 2), "load_after": round(os.getloadavg()[0], 2),
                     "cores_used_by_this_process": round((time.process_time() - cpu) / (time.perf_counter() - wall), 2)}


def rle_runs(mask: np.ndarray) -> int:
    """Length of the run-length encoding of an ``(H, W)`` mask (segment-anything's, column-major)."""
    flat = np.concatenate([[0], np.asarray(mask, np.int8).T.ravel(), [0]])
    return int(np.count_nonzero(np.diff(flat)))


def cached_zarr(cache_dir: Path) -> Path:
    """The one embedding file the session wrote under ``cache_dir``."""
    (path,) = (cache_dir / "embeddings").glob("*/*.zarr")
    return path


def prompt_latency(session: SamSession, rgb: np.ndarray, labels: np.ndarray, n_prompts: int) -> dict:
    """Figure 1: ours vs micro-sam, per prompt, alternating which side goes first."""
    embeddings = precompute_image_embeddings(
        session.predictor, rgb, save_path=str(cached_zarr(session.cache_dir)), ndim=2, verbose=False
    )
    centers, boxes = get_centers_and_bounding_boxes(labels)
    ids = sorted(centers)
    prompts = []
    for i in range(n_prompts):  # alternate point, box; objects cycled when there are fewer than prompts
        object_id = ids[(i // 2) % len(ids)]
        prompts.append(("point", np.asarray(centers[object_id], float)) if i % 2 == 0
                       else ("box", np.asarray(boxes[object_id], float)))

    def ours(kind: str, prompt: np.ndarray) -> np.ndarray:
        if kind == "point":
            return session.segment(prompt[None], np.array([1]))
        return session.segment(box=prompt)

    def micro_sam(kind: str, prompt: np.ndarray) -> np.ndarray:
        if kind == "point":
            return segment_from_points(session.predictor, prompt[None], np.array([1]), image_embeddings=embeddings)[0]
        return segment_from_box(session.predictor, prompt, image_embeddings=embeddings)[0]

    for kind, prompt in prompts[:WARMUP]:
        ours(kind, prompt)
        micro_sam(kind, prompt)
    times = {"ours": {"point": [], "box": []}, "micro_sam": {"point": [], "box": []}}
    same, predicted_runs = 0, []
    for i, (kind, prompt) in enumerate(prompts):
        sides = (("ours", ours), ("micro_sam", micro_sam))
        masks = {}
        for name, call in sides if i % 4 < 2 else sides[::-1]:
            start = time.perf_counter()
            masks[name] = call(kind, prompt)
            times[name][kind].append(time.perf_counter() - start)
        same += bool(np.array_equal(masks["ours"], np.asarray(masks["micro_sam"], bool)))
        predicted_runs.append(rle_runs(masks["ours"]))
    result = {"objects_in_frame": len(ids), "prompts": n_prompts, "identical_masks": same,
              # random weights give speckled masks: their run-length encodings (what the automatic
              # segmentation copies around in Python lists) are far longer than real objects'
              "rle_runs_median_predicted": float(np.median(predicted_runs)),
              "rle_runs_median_reference": float(np.median([rle_runs(labels == i) for i in ids]))}
    for name, by_kind in times.items():
        result[name] = {"all": percentiles_ms(by_kind["point"] + by_kind["box"]),
                        "point": percentiles_ms(by_kind["point"]), "box": percentiles_ms(by_kind["box"])}
    for stat in ("p50_ms", "p95_ms"):
        result[f"ratio_{stat[:3]}_ours_over_micro_sam"] = result["ours"]["all"][stat] / result["micro_sam"]["all"][stat]
    return result


def cached_reopen(cache_dir: Path, plane: np.ndarray, labels: np.ndarray, reopens: int) -> dict:
    """Figure 2: a fresh session on the same cache reopens the image and its autosaved labels."""
    store = AnnotationStore(cache_dir)
    store.save(content_key(plane), labels, source="bench")
    zarr = cached_zarr(cache_dir)
    reopen, set_image, model_load, micro_sam = [], [], [], []
    for i in range(reopens):
        session = SamSession(cache_dir)
        model_load.append(timed(lambda: session.set_model(MODEL)))
        assert session.is_cached(sam_rgb(plane, (0,))), "the image should be cached by figure 1"

        def ours() -> None:  # what the widget does for "Compute embeddings" on a cached image
            start = time.perf_counter()
            rgb = sam_rgb(plane, (0,))
            saved = store.load(content_key(plane), plane.shape)
            set_image.append(timed(lambda: session.set_image(rgb)))
            reopen.append(time.perf_counter() - start)
            assert saved is not None

        def theirs() -> None:
            micro_sam.append(timed(lambda: precompute_image_embeddings(
                session.predictor, sam_rgb(plane, (0,)), save_path=str(zarr), ndim=2, verbose=False)))

        for side in (ours, theirs) if i % 2 == 0 else (theirs, ours):
            side()
    stats = lambda values: {"median_s": float(np.median(values)), "max_s": float(np.max(values)), "n": len(values)}
    result = {"reopen_total": stats(reopen), "set_image_only": stats(set_image),
              "micro_sam_precompute_read": stats(micro_sam), "model_load_not_timed_above": stats(model_load)}
    result["ratio_median_ours_over_micro_sam"] = result["reopen_total"]["median_s"] / result["micro_sam_precompute_read"]["median_s"]
    return result


def export(work: Path, planes: np.ndarray, masks: np.ndarray) -> dict:
    """Figure 4: ``write_samples`` of 20 pairs vs tifffile writing the same pairs."""
    def ours() -> None:
        samples = [SampleInput(plane[None], mask, split="train", source=f"HeLa frame {t}")
                   for t, (plane, mask) in enumerate(zip(planes, masks))]
        write_samples(work / "export.zarr", samples, channel_names=["fluorescence"])

    def theirs() -> None:
        folder = work / "export_tif"
        for sub in ("images", "labels"):
            (folder / sub).mkdir(parents=True)
        for t, (plane, mask) in enumerate(zip(planes, masks)):
            tifffile.imwrite(folder / "images" / f"frame_{t:03d}.tif", plane)
            tifffile.imwrite(folder / "labels" / f"frame_{t:03d}.tif", mask)

    size = lambda path: sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20
    result = {"images": len(planes), "ours_s": [], "tifffile_s": []}
    for _ in range(2):  # twice, alternating, into fresh folders
        for name, call, folder in (("ours", ours, "export.zarr"), ("tifffile", theirs, "export_tif")):
            shutil.rmtree(work / folder, ignore_errors=True)
            result[f"{name}_s"].append(timed(call))
            result[f"{name}_MiB"] = size(work / folder)
    result["ratio_best_ours_over_tifffile"] = min(result["ours_s"]) / min(result["tifffile_s"])
    return result


class GcPauses:
    """``gc.callbacks`` entry recording each garbage collection of at least ``min_s``: a collection
    holds the GIL throughout, so no other Python thread (the GUI's included) runs meanwhile."""

    def __init__(self, min_s: float = 0.02) -> None:
        self.min_s = min_s
        self.events: list[dict] = []
        self._start = 0.0

    def __call__(self, phase: str, info: dict) -> None:
        now = time.perf_counter()
        if phase == "start":
            self._start = now
        elif now - self._start >= self.min_s:
            thread = threading.current_thread()
            self.events.append({"start": self._start, "end": now, "ms": round((now - self._start) * 1000, 1),
                                "generation": info["generation"],
                                "thread": "main (GUI)" if thread is threading.main_thread() else thread.name})


class GilWatchdog:
    """A Python thread that sleeps ``period_s`` in a loop; when it wakes more than ``late_s`` late,
    the GIL was held elsewhere (or the CPU was taken): it records when, how long, and where the
    main (GUI) thread and the widget's worker (the thread inside session.py) are right then.
    """

    def __init__(self, period_s: float = 0.01, late_s: float = 0.05) -> None:
        self.period_s, self.late_s = period_s, late_s
        self.events: list[dict] = []
        self._stop = threading.Event()
        self._main = threading.main_thread().ident
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        def where(frame) -> list[str]:
            return [f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in traceback.extract_stack(frame)[-6:]]

        last, last_cpu = time.perf_counter(), time.process_time()
        while not self._stop.wait(self.period_s):
            now = time.perf_counter()
            late = now - last - self.period_s
            if late > self.late_s:
                frames = sys._current_frames()
                worker = [where(frame) for ident, frame in frames.items()
                          if ident != self._main and "session.py" in str(traceback.extract_stack(frame))]
                cpu = time.process_time()
                self.events.append({"start": last, "end": now, "late_ms": round(late * 1000, 1),
                                    "process_cpu_share": round((cpu - last_cpu) / (now - last), 2),
                                    "main": where(frames[self._main]) if self._main in frames else [],
                                    "worker": worker[0] if worker else []})
            last, last_cpu = now, time.process_time()


def gui_stalls(work: Path, plane: np.ndarray, labels: np.ndarray, grid: int) -> dict:
    """Figure 3: napari's event loop heartbeat while the docked widget embeds, then segments automatically."""
    if os.environ.get("DISPLAY"):
        return _gui_stalls(work, plane, labels, grid)
    from pyvirtualdisplay import Display

    with Display(visible=False, size=(1600, 1000)):
        return _gui_stalls(work, plane, labels, grid)


def _gui_stalls(work: Path, plane: np.ndarray, labels: np.ndarray, grid: int) -> dict:
    import napari
    from qtpy.QtCore import QEventLoop, Qt, QTimer
    from qtpy.QtWidgets import QApplication

    from napari_raysam.widgets.annotator import POINTS_LAYER, AnnotatorWidget

    viewer = napari.Viewer(show=True)
    viewer.add_image(plane, name="HeLa frame 0")
    widget = AnnotatorWidget(viewer, cache_dir=work / "gui-cache")
    viewer.window.add_dock_widget(widget, name="SAM annotator")
    widget.model_panel.combo.setCurrentText(MODEL)
    widget.segment_panel.grid_spin.setValue(grid)
    app = QApplication.instance()

    # GUI-thread work of the widget, timed: (name, start, s). Instance attributes shadow the methods;
    # the widget looks them up when called, so its own code runs unchanged inside the wrappers.
    callbacks: list[tuple[str, float, float]] = []
    for owner, names in ((widget, ("compute_embeddings", "automatic_segmentation", "_switch_plane", "_ensure_layers",
                                   "_embeddings_ready", "_automatic_ready", "_finished", "_model_loaded")),
                         (widget.store, ("load",)), (type(viewer), ("add_labels", "add_points", "add_shapes"))):
        for name in names:
            def wrapper(*args, _method=getattr(owner, name), _name=name, **kwargs):
                start = time.perf_counter()
                try:
                    return _method(*args, **kwargs)
                finally:
                    callbacks.append((_name, start, time.perf_counter() - start))
            setattr(owner, name, wrapper)

    beats: list[float] = []
    heartbeat = QTimer(interval=HEARTBEAT_MS)
    heartbeat.setTimerType(Qt.TimerType.PreciseTimer)
    heartbeat.timeout.connect(lambda: beats.append(time.perf_counter()))
    heartbeat.start()

    def phase(action: Callable[[], None] | None, tail_s: float = 0.5, limit_s: float = 400) -> tuple[float, float]:
        """Run the event loop: ``action`` as a queued event (100 ms in, so a stall it causes lies between
        two heartbeats of the window), until the widget's worker is done, plus ``tail_s``."""
        loop = QEventLoop()
        state = {"started": action is None, "done_at": None}

        def go() -> None:
            state["started"] = True
            action()

        def poll() -> None:
            now = time.perf_counter()
            if state["started"] and widget._worker is None and state["done_at"] is None:
                state["done_at"] = now
            if state["done_at"] is not None and now - state["done_at"] >= tail_s:
                loop.quit()
        poller = QTimer(interval=5)
        poller.timeout.connect(poll)
        poller.start()
        QTimer.singleShot(int(limit_s * 1000), loop.quit)
        if action is not None:
            QTimer.singleShot(100, go)
        start = time.perf_counter()
        loop.exec()
        poller.stop()
        return start, time.perf_counter()

    def gaps(window: tuple[float, float]) -> dict:
        inside = np.array([b for b in beats if window[0] <= b <= window[1]])
        gap = np.diff(inside) * 1000
        worst = int(np.argmax(gap))
        at = (inside[worst], inside[worst + 1])
        overlapping = [(name, round(s * 1000, 1)) for name, begin, s in callbacks
                       if begin < at[1] and begin + s > at[0]]
        held = [event for event in watchdog.events if event["start"] < at[1] and event["end"] > at[0]]
        overlaps = lambda event, start, end: event["start"] < end and event["end"] > start
        long_gaps = [(inside[i], inside[i + 1]) for i in np.flatnonzero(gap > 100)]
        return {"gil_stalls_in_max_gap": held, "gil_stalls_over_100ms": sum(e["late_ms"] > 100 for e in watchdog.events
                                                                         if window[0] <= e["start"] <= window[1]),
                "gc_pauses_in_max_gap": [{k: e[k] for k in ("ms", "generation", "thread")}
                                         for e in gc_pauses.events if overlaps(e, *at)],
                "gaps_over_100ms_with_a_gc_pause_over_50ms": sum(
                    any(e["ms"] > 50 and overlaps(e, *g) for e in gc_pauses.events) for g in long_gaps),
                "gc_pauses_over_100ms": sum(e["ms"] > 100 for e in gc_pauses.events if overlaps(e, *window)),
                "gc_pauses_over_100ms_by_thread": dict(Counter(e["thread"] for e in gc_pauses.events
                                                               if e["ms"] > 100 and overlaps(e, *window))),
                "gc_pause_max_ms": max([e["ms"] for e in gc_pauses.events if overlaps(e, *window)], default=0.0),
                "wall_s": window[1] - window[0], "beats": len(inside), "max_gap_ms": float(gap.max()),
                "p99_gap_ms": float(np.percentile(gap, 99)), "median_gap_ms": float(np.median(gap)),
                "gaps_over_100ms": int((gap > 100).sum()),
                "max_gap_starts_s_into_phase": float(at[0] - window[0]),
                "widget_callbacks_in_max_gap_ms": overlapping}

    watchdog = GilWatchdog()
    watchdog.start()
    gc_pauses = GcPauses()
    gc.callbacks.append(gc_pauses)
    phase(widget.load_model)  # not a figure: the model is loaded before the phases that are
    result = {"idle": gaps(phase(None, tail_s=1.0))}
    result["embeddings"] = gaps(phase(widget.compute_embeddings))
    result["automatic_segmentation"] = gaps(phase(widget.automatic_segmentation))
    watchdog.stop()
    gc.callbacks.remove(gc_pauses)
    result["status_line"] = widget.status.text()
    result["widget_callbacks_ms"] = [(name, round(s * 1000, 1)) for name, _, s in callbacks]

    # The widget's own segment path (not required): prompt -> mask in the current-object layer, drawn.
    centers, _ = get_centers_and_bounding_boxes(labels)
    points = widget.viewer.layers[POINTS_LAYER]
    session_segment, session_times, times = widget.session.segment, [], []

    def timed_segment(*args):
        start = time.perf_counter()
        try:
            return session_segment(*args)
        finally:
            session_times.append(time.perf_counter() - start)
    widget.session.segment = timed_segment
    app.processEvents()
    for center in list(centers.values())[:20 + WARMUP]:
        widget.clear_prompts()
        points.data = np.asarray(center, float)[None]
        app.processEvents()
        times.append(timed(lambda: (widget.segment(), app.processEvents())))  # incl. the layer update and redraw
    result["widget_segment_point"] = percentiles_ms(times[WARMUP:])
    result["widget_segment_point_session_part"] = percentiles_ms(session_times[WARMUP:])

    # What one (H, W) labels layer costs the GUI thread: the widget adds two when an image is
    # first annotated and one when the automatic segmentation returns.
    add_labels = []
    for _ in range(3):
        start = time.perf_counter()
        layer = viewer.add_labels(labels.astype(np.uint32), name="bench labels")
        added = time.perf_counter()
        app.processEvents()  # its first draw
        add_labels.append({"add_labels_ms": (added - start) * 1000, "first_draw_ms": (time.perf_counter() - added) * 1000})
        viewer.layers.remove(layer)
        app.processEvents()
    result["add_labels_layer"] = add_labels
    heartbeat.stop()
    viewer.close()
    for name in ("add_labels", "add_points", "add_shapes"):  # napari's own methods back in place
        delattr(type(viewer), name)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=100)
    parser.add_argument("--reopens", type=int, default=10)
    parser.add_argument("--grid", type=int, default=32, help="points per side of automatic segmentation")
    parser.add_argument("--no-gui", action="store_true", help="skip figure 3 (needs napari and an X server)")
    args = parser.parse_args()
    print(machine())
    print("shared machine: other processes may have been running during these timings", flush=True)
    work = Path(tempfile.mkdtemp(prefix="bench-annotator-"))
    frames, masks = hela_frames()
    planes = np.stack([square(frame, np.median(frame)) for frame in frames])
    label_planes = np.stack([square(mask, 0) for mask in masks])
    plane, labels = planes[0], label_planes[0]
    rgb = sam_rgb(plane, (0,))
    summary: dict = {"machine": machine(), "model": MODEL, "image": f"HeLa frame 0, {SIDE} x {SIDE} (cropped/padded from 700 x 1100)"}

    session = SamSession(work / "cache")
    summary["model_load_s"] = timed(lambda: session.set_model(MODEL))
    summary["embeddings_s"] = timed(lambda: session.set_image(rgb))
    print(f"model load {summary['model_load_s']:.2f} s, embeddings of {SIDE} x {SIDE} {summary['embeddings_s']:.2f} s", flush=True)

    load = summary["load"] = {}
    with usage(load, "prompt"):
        prompt = summary["prompt"] = prompt_latency(session, rgb, labels, args.prompts)
    ours, theirs = prompt["ours"]["all"], prompt["micro_sam"]["all"]
    print(f"1. prompt -> mask ({prompt['prompts']} prompts, half points half boxes, {prompt['objects_in_frame']} objects): "
          f"ours p50 {ours['p50_ms']:.1f} ms p95 {ours['p95_ms']:.1f} ms [goal p95 <= {GOALS['prompt_p95_ms']:.0f}]; "
          f"micro-sam p50 {theirs['p50_ms']:.1f} ms p95 {theirs['p95_ms']:.1f} ms; ours/micro-sam "
          f"p50 {prompt['ratio_p50_ours_over_micro_sam']:.2f} p95 {prompt['ratio_p95_ours_over_micro_sam']:.2f}; "
          f"identical masks {prompt['identical_masks']}/{prompt['prompts']}", flush=True)
    print(f"   random-weight masks are speckled: median RLE length {prompt['rle_runs_median_predicted']:.0f} runs vs "
          f"{prompt['rle_runs_median_reference']:.0f} for the reference objects", flush=True)
    for kind in ("point", "box"):
        print(f"   {kind}: ours p50 {prompt['ours'][kind]['p50_ms']:.1f} p95 {prompt['ours'][kind]['p95_ms']:.1f} ms; "
              f"micro-sam p50 {prompt['micro_sam'][kind]['p50_ms']:.1f} p95 {prompt['micro_sam'][kind]['p95_ms']:.1f} ms", flush=True)

    with usage(load, "reopen"):
        reopen = summary["reopen"] = cached_reopen(work / "cache", plane, labels, args.reopens)
    print(f"2. cached reopen of {SIDE} x {SIDE} (sam_rgb + labels load + set_image, {args.reopens}x): median "
          f"{reopen['reopen_total']['median_s']:.3f} s max {reopen['reopen_total']['max_s']:.3f} s [goal <= {GOALS['reopen_s']}]; "
          f"set_image alone median {reopen['set_image_only']['median_s']:.3f} s; micro-sam precompute_image_embeddings "
          f"read median {reopen['micro_sam_precompute_read']['median_s']:.3f} s max {reopen['micro_sam_precompute_read']['max_s']:.3f} s; "
          f"ours/micro-sam {reopen['ratio_median_ours_over_micro_sam']:.2f} (model load before it, not timed: "
          f"median {reopen['model_load_not_timed_above']['median_s']:.2f} s)", flush=True)

    with usage(load, "export"):
        exported = summary["export"] = export(work, planes, label_planes)
    print(f"4. export of {exported['images']} images {SIDE} x {SIDE} with labels: write_samples "
          f"{', '.join(f'{s:.2f}' for s in exported['ours_s'])} s [goal <= {GOALS['export_s']}] "
          f"({exported['ours_MiB']:.1f} MiB); tifffile {', '.join(f'{s:.2f}' for s in exported['tifffile_s'])} s "
          f"({exported['tifffile_MiB']:.1f} MiB); best ours/tifffile {exported['ratio_best_ours_over_tifffile']:.2f}", flush=True)

    if not args.no_gui:
        with usage(load, "gui"):
            gui = summary["gui"] = gui_stalls(work, plane, labels, args.grid)
        for name in ("idle", "embeddings", "automatic_segmentation"):
            g = gui[name]
            print(f"3. event loop, {name} ({g['wall_s']:.1f} s, heartbeat {HEARTBEAT_MS} ms): max gap {g['max_gap_ms']:.0f} ms, "
                  f"p99 {g['p99_gap_ms']:.0f} ms, {g['gaps_over_100ms']} gaps > 100 ms [goal max <= {GOALS['stall_ms']:.0f}]; "
                  f"widget callbacks in the worst gap: {g['widget_callbacks_in_max_gap_ms']}; "
                  f"GIL held > 100 ms: {g['gil_stalls_over_100ms']}x", flush=True)
            print(f"   GC pauses (hold the GIL): max {g['gc_pause_max_ms']:.0f} ms, {g['gc_pauses_over_100ms']} over 100 ms "
                  f"(by thread {g['gc_pauses_over_100ms_by_thread']}); "
                  f"{g['gaps_over_100ms_with_a_gc_pause_over_50ms']} of the {g['gaps_over_100ms']} gaps > 100 ms contain one > 50 ms; "
                  f"in the worst gap: {g['gc_pauses_in_max_gap']}", flush=True)
            for event in g["gil_stalls_in_max_gap"]:
                print(f"   GIL/CPU stall of {event['late_ms']} ms in the worst gap (this process used "
                      f"{event['process_cpu_share']} cores meanwhile): worker at {event['worker'][-3:]}, "
                      f"main at {event['main'][-2:]}", flush=True)
        print(f"   widget callbacks (ms): {gui['widget_callbacks_ms']}; last status: {gui['status_line']!r}")
        print("   one 1024 x 1024 labels layer on the GUI thread (ms): " + "; ".join(
            f"add {a['add_labels_ms']:.0f} + first draw {a['first_draw_ms']:.0f}" for a in gui["add_labels_layer"]), flush=True)
        w = gui["widget_segment_point"]
        s = gui["widget_segment_point_session_part"]
        print(f"   widget segment() of one point incl. layer update and redraw: p50 {w['p50_ms']:.1f} ms p95 {w['p95_ms']:.1f} ms "
              f"(of which SamSession.segment p50 {s['p50_ms']:.1f} ms p95 {s['p95_ms']:.1f} ms)", flush=True)

    print("load average (1 min) before/after each figure, and cores this process used meanwhile: " + "; ".join(
        f"{name} {u['load_before']}/{u['load_after']}, {u['cores_used_by_this_process']} cores" for name, u in load.items()))
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(summary, indent=2, default=str))


if __name__ == "__main__":
    main()
