"""The annotator's series row: previous / next image, "n of N annotated", the next image made ready, the suggested one.

Thin over :mod:`napari_raysam.annotator.series`. The series is the planes of the image chosen in
the dock (a stack, or a folder of HPA fields read as one). Going to another plane moves napari's
slider; the dock follows the slider as it always does (``AnnotatorWidget._on_slice_change``).
While the user works on a plane, one background worker reads the next plane (in the direction
of travel), computes its embeddings into the cache and keeps the plane ready, so arriving there
costs only reading the cache; then it checks which planes of the series were annotated before;
then, one plane at a time, it scores how unsure the current model is about each plane not yet
annotated (``SamSession.uncertainty``), which *Suggested* goes to. Each background task is one
plane, so the next plane's read-ahead never waits behind the whole ranking; a new model (a
fine-tune loaded) ranks the series again.

That work runs on a thread of its own at the lowest CPU priority (niceness 19; PyTorch's OpenMP
threads, started from it, inherit it), so a prompt on the plane shown, answered on napari's
thread pool at normal priority, gets the cores first instead of sharing them with the next
plane's image encoder or the ranking.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from qtpy.QtCore import QThreadPool, Signal
from qtpy.QtWidgets import QHBoxLayout, QLabel, QPushButton, QWidget

from backend.cpu_priority import LOWEST, lower_cpu_priority
from napari_raysam.annotator.image_source import ImageError
from napari_raysam.annotator.series import (
    PreparedPlane,
    annotated_planes,
    prepare_plane,
    series_length,
    series_summary,
    step_index,
    suggested_plane,
)
from napari_raysam.widgets.tasks import start_task

if TYPE_CHECKING:
    from napari_raysam.widgets.annotator import AnnotatorWidget

log = logging.getLogger(__name__)

SHORTCUTS = {"next": "N", "previous": "Shift-N", "suggested": "G"}  # free in napari's keymap and the dock's


_background_pool: QThreadPool | None = None


def _background(task):
    """``task`` to run on the series' own background thread: one thread for every dock, kept alive (its
    OpenMP threads with it), at the lowest CPU priority from its first task on."""
    global _background_pool
    if _background_pool is None:
        _background_pool = QThreadPool()
        _background_pool.setMaxThreadCount(1)
        _background_pool.setExpiryTimeout(-1)  # a new thread would start new OpenMP threads

    def at_low_priority():
        lower_cpu_priority(LOWEST)
        return task()

    return _background_pool, at_low_priority


class SeriesPanel(QWidget):
    """Previous / next buttons and the series' count; part of the annotator dock (uses its helpers)."""

    _checking = Signal(int, int)  # (planes checked, planes), from the background worker

    def __init__(self, annotator: AnnotatorWidget) -> None:
        super().__init__()
        self._annotator = annotator
        self._series: tuple = ()  # which series the state below is about (_series_id)
        self._annotating: tuple = ()  # the series whose plane the dock annotates
        self._length = 0
        self._saved: dict[int, bool] = {}  # plane -> has objects, as this dock saved it: overrides the check
        self._checked: list[bool] | None = None  # per plane, from the stored annotations, once checked
        self._prepared: PreparedPlane | None = None  # the plane made ready ahead
        self._ahead: tuple[int, ...] | None = None  # the plane last made ready (or tried): not tried twice
        self._ranked_for: tuple | None = None  # (model fingerprint, SAM channels) _uncertainty is about
        self._uncertainty: dict[int, float | None] = {}  # plane -> the model's uncertainty; None: cannot be read
        self._direction = 1
        self._worker = None
        self._closed = False  # the dock was deleted (napari closed): a worker finishing late starts nothing
        annotator.destroyed.connect(lambda: setattr(self, "_closed", True))

        row = QHBoxLayout(self)
        row.setContentsMargins(0, 0, 0, 0)
        self.previous_button = QPushButton("◀ Previous", toolTip=f"Annotate the previous image of the series [{SHORTCUTS['previous']}]")
        self.previous_button.clicked.connect(self.previous)
        self.label = QLabel(toolTip="The image shown, and how many images of the series have committed objects")
        self.next_button = QPushButton("Next ▶", toolTip=(
            f"Annotate the next image of the series [{SHORTCUTS['next']}]; its embeddings are computed "
            f"in the background while you work on this one"
        ))
        self.next_button.clicked.connect(self.next)
        self.suggested_button = QPushButton("Suggested ▶")
        self.suggested_button.clicked.connect(self.suggested)
        row.addWidget(self.previous_button)
        row.addWidget(self.label, stretch=1)
        row.addWidget(self.next_button)
        row.addWidget(self.suggested_button)
        self._checking.connect(lambda done, total: self._show(f", checking {done} of {total}…"))
        self.refresh()

    # ------------------------------------------------------------------ what the dock calls
    def next(self) -> None:
        """Show (and annotate) the next image of the series."""
        self._step(1)

    def previous(self) -> None:
        """Show (and annotate) the previous image of the series."""
        self._step(-1)

    def suggested(self) -> None:
        """Show (and annotate) the image the current model is least sure of, of those not annotated yet."""
        target = self._suggestion()
        if target is None:
            self._annotator._say(self.suggested_button.toolTip())
            return
        self._go((target,))

    def annotated(self) -> list[bool]:
        """Per plane of the chosen image's series, whether it has committed objects (False until checked)."""
        checked = self._checked or [False] * self._length
        return [self._saved.get(z, checked[z]) for z in range(self._length)]

    def refresh(self) -> None:
        """Follow the dock's image choice and the plane shown: the count, the buttons, what to prepare."""
        shown = self._shown()
        series = self._series_id() if shown is not None else ()
        if series != self._series:
            self._series, self._length = series, series_length(shown[0]) if shown is not None else 0
            self._saved, self._checked, self._prepared, self._ahead = {}, None, None, None
            self._ranked_for, self._uncertainty = None, {}
        index = shown[2] if shown is not None else ()
        self.previous_button.setEnabled(step_index(index, self._length, -1) is not None)
        self.next_button.setEnabled(step_index(index, self._length, 1) is not None)
        self._show_suggestion()
        self._show("" if self._checked is not None else ", checking…")
        self._work_ahead()

    def plane_switched(self, index: tuple[int, ...], has_objects: bool) -> None:
        """The dock now annotates plane ``index`` of the chosen image; ``has_objects``: restored objects."""
        self._annotating = self._series_id()
        self.annotations_saved(index, has_objects)

    def annotations_saved(self, index: tuple[int, ...], has_objects: bool) -> None:
        """The dock saved the annotated plane ``index``; ``has_objects``: its labels hold an object."""
        if self._annotating == self._series:
            self._saved[index[0] if index else 0] = has_objects
            self.refresh()

    def take(self, index: tuple[int, ...], sam_channels: tuple[int, ...]) -> PreparedPlane | None:
        """Plane ``index`` of the chosen image if it was made ready ahead for these SAM channels, else None."""
        prepared = self._prepared
        if prepared is None or self._series_id() != self._series:
            return None
        return prepared if (prepared.index, prepared.sam_channels) == (index, sam_channels) else None

    # ------------------------------------------------------------------ navigation
    def _series_id(self) -> tuple:
        """What makes the chosen image this one: its chooser entry and first-axis reading, and its
        layers' data (a layer given new data is another image)."""
        annotator = self._annotator
        return (annotator.image.key(), *(id(layer.data) for layer in annotator.image.chosen_layers()))

    def _shown(self):
        """``(channels, layer, index)`` of the chosen image's plane in view, or None without a usable image."""
        try:
            return self._annotator.image.shown_plane()
        except ImageError:
            return None

    def _show(self, checking: str) -> None:
        shown = self._shown()
        if not self._length or shown is None:
            self.label.setText("no image")
        else:
            self.label.setText(series_summary(shown[2], self.annotated()) + (checking if self._checked is None else ""))

    def _step(self, step: int) -> None:
        shown = self._shown()
        target = step_index(shown[2], self._length, step) if shown is not None else None
        if target is None:
            self._annotator._say(f"no image to go to: this is the {'last' if step > 0 else 'first'} of the series")
            return
        self._direction = step
        self._go(target)

    def _go(self, target: tuple[int, ...]) -> None:
        """Move napari's slider to plane ``target`` of the chosen image."""
        layer, viewer = self._shown()[1], self._annotator.viewer
        # napari's slider shows the plane, and the dock follows the slider (embedding it, or taking it ready)
        data_point = list(layer.world_to_data(viewer.dims.point))
        data_point[-3] = target[0]  # the stack axis is third from last (a channel axis comes first)
        viewer.dims.set_point(viewer.dims.ndim - 3, layer.data_to_world(data_point)[-3])

    # ------------------------------------------------------------------ suggestion
    def _suggestion(self) -> int | None:
        shown = self._shown()
        if shown is None or not shown[2] or self._checked is None or self._ranking_key() != self._ranked_for:
            return None  # a ranking by another model, or of other channels, says nothing about these
        ranked = {z: value for z, value in self._uncertainty.items() if value is not None}
        return suggested_plane(ranked, self.annotated(), shown[2][0])

    def _ranking_key(self) -> tuple | None:
        """What the uncertainties depend on besides the planes: the model and the SAM channels."""
        model = self._annotator.session.model
        return None if model is None else (model.fingerprint, self._annotator.image.sam_channels())

    def _unranked(self) -> list[int]:
        """The planes not annotated whose uncertainty is still to be scored, in series order."""
        annotated = self.annotated()
        return [z for z in range(self._length) if not annotated[z] and z not in self._uncertainty]

    def _show_suggestion(self) -> None:
        target = self._suggestion()
        self.suggested_button.setEnabled(target is not None)
        self.suggested_button.setText("Suggested ▶" if target is None else f"Suggested: {target + 1} ▶")
        if self._length < 2:
            tip = "a single image: there is no other image to suggest"
        elif self._annotator.session.model is None:
            tip = "load a model: the suggestion is the image the model is least sure of"
        elif self._checked is None or (self._ranked_for is None and not self._uncertainty):
            tip = "no suggestion yet: the images are ranked in the background once you start on this series"
        else:
            left = len(self._unranked())
            ranking = f"; ranking the others, {left} to go" if left else ""
            if target is None:
                tip = f"no image to suggest: every other image is annotated{ranking}"
            else:
                tip = (f"Go to image {target + 1}: of the images not annotated yet, the model is least sure of it "
                       f"(uncertainty {self._uncertainty[target]:.2f}){ranking} [{SHORTCUTS['suggested']}]")
        self.suggested_button.setToolTip(tip)

    def _ranked(self, result: tuple[tuple, int, float | None]) -> None:
        key, plane, value = result
        if key == self._ranked_for:
            self._uncertainty[plane] = value
            self._show_suggestion()

    # ------------------------------------------------------------------ background
    def _work_ahead(self) -> None:
        """Start the next background task, if any: make the next plane ready, else check the others."""
        annotator = self._annotator
        if self._closed or self._worker is not None:
            return
        shown = self._shown()
        if shown is None or annotator.session.model is None:
            return
        if annotator._plane_key is None or self._annotating != self._series:
            return  # nothing is read ahead before the user starts on this series
        channels, layer, index = shown
        # the next plane in the direction of travel; at the end of the series, the one back
        target = step_index(index, self._length, self._direction) or step_index(index, self._length, -self._direction)
        if target is not None and target != self._ahead:
            self._ahead = target
            session, sam_channels = annotator.session, annotator.image.sam_channels()

            def make_ready() -> PreparedPlane:
                prepared = prepare_plane(channels, target, sam_channels, layer.name)
                session.cache_embeddings(prepared.rgb)
                return prepared

            self._start(make_ready, lambda prepared: setattr(self, "_prepared", prepared))
        elif self._checked is None:
            store, progress = annotator.store, self._checking.emit
            self._start(lambda: annotated_planes(channels, store, progress), self._check_done)
        elif self._length > 1:
            self._rank_one(channels, layer.name)

    def _rank_one(self, channels, name: str) -> None:
        """Score the model's uncertainty about the next plane still to rank, if any (for the current model)."""
        session, sam_channels, key = self._annotator.session, self._annotator.image.sam_channels(), self._ranking_key()
        if key != self._ranked_for:  # another model or other channels: the ranking starts over
            self._ranked_for, self._uncertainty = key, {}
        unranked = self._unranked()
        if not unranked:
            return
        plane = unranked[0]

        def score() -> tuple[tuple, int, float | None]:
            try:
                return key, plane, session.uncertainty(prepare_plane(channels, (plane,), sam_channels, name).rgb)
            except ImageError:  # said when the plane is shown; it is not suggested
                return key, plane, None

        self._start(score, self._ranked)

    def _start(self, task, done) -> None:
        series = self._series
        pool, task = _background(task)
        self._worker = start_task(  # held here until it finished, as napari's own pool holds its workers
            task, pool=pool, failed=self._failed, finished=self._finished,
            done=lambda result: done(result) if series == self._series and not self._closed else None,
        )

    def _check_done(self, annotated: list[bool]) -> None:
        self._checked = annotated
        self.refresh()

    def _failed(self, error: Exception) -> None:
        # a plane that cannot be made ready says why when it is shown; anything else is a bug
        if not isinstance(error, ImageError):
            log.error("napari-raysam: working ahead on the series failed", exc_info=error)

    def _finished(self) -> None:
        self._worker = None
        self._work_ahead()
