"""The "SAM annotator" dock widget: interactive SAM annotation in napari.

Thin by design: images are read by :mod:`napari_raysam.annotator.image_source`, SAM runs in
:class:`napari_raysam.annotator.session.SamSession`, commits/undo and autosave live in
:mod:`napari_raysam.annotator.annotations`, export in :func:`backend.dataset.write_samples`.
The dock's parts are widgets of their own: the image box (``annotator_image``), the series row
(``annotator_series``), the model and export boxes (``annotator_panels``), the segment box and
the keys (``annotator_segment``), the layers (``annotator_layers``). This module wires them
to buttons, keys and thread workers. Everything slow (model loading, embeddings, segmentation,
export) runs in a worker thread (``tasks``); errors end up in the status line, in plain words,
never in a traceback dialog.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import napari
from napari.layers import Image
from qtpy.QtCore import QObject, Qt, QTimer, Signal
from qtpy.QtWidgets import QLabel, QProgressBar, QVBoxLayout, QWidget

from backend.dataset import DatasetError
from backend.models import ModelError
from backend.storage import plain_reason
from napari_raysam.annotator.annotations import (
    AnnotationStore,
    CommitError,
    CommitHistory,
    crop_to_objects,
    object_count,
    proposal_message,
)
from napari_raysam.annotator.export import AnnotatedImage, EmbeddingSource, export_annotations
from napari_raysam.annotator.image_source import ImageChannels, ImageError
from napari_raysam.annotator.progress import ProgressCallback
from napari_raysam.annotator.prompts import NEGATIVE, POSITIVE, PromptError, object_prompts
from napari_raysam.annotator.series import PreparedPlane, prepare_plane
from napari_raysam.annotator.session import AIS, SamSession, SessionError
from napari_raysam.widgets.annotator_image import ImageChooser
from napari_raysam.widgets.annotator_panels import ExportPanel, ModelPanel
from napari_raysam.widgets.annotator_segment import SHORTCUTS, SegmentPanel
from napari_raysam.widgets.annotator_series import SeriesPanel
from napari_raysam.widgets.annotator_layers import (
    AUTOMATIC_LAYER,
    BOXES_LAYER,
    COMMITTED_LAYER,
    CURRENT_LAYER,
    POINTS_LAYER,
    AnnotatorLayers,
)
from napari_raysam.widgets.scrolling import ContentScroll
from napari_raysam.widgets.tasks import failure_message, start_task, stop_if_closing

_AUTOSAVE_DELAY_MS = 500  # hand painting autosaves once the brush rests this long

# The user's expected errors: shown as they are. Anything else is a bug: logged with its traceback.
_USER_ERRORS = (ImageError, SessionError, ModelError, DatasetError, CommitError, OSError)


class _Progress(QObject):
    """Carries ``(done, total)`` to the progress bar and status lines to the dock, from a worker
    thread (queued across threads)."""

    changed = Signal(int, int)
    status = Signal(str)


_ANNOTATORS: weakref.WeakValueDictionary[int, AnnotatorWidget] = weakref.WeakValueDictionary()


def annotator_for(viewer: napari.viewer.Viewer) -> AnnotatorWidget | None:
    """The annotator dock open in ``viewer``, if any (the fine-tune dock works through it)."""
    return _ANNOTATORS.get(_viewer_key(viewer))


def _viewer_key(viewer: napari.viewer.Viewer) -> int:
    # napari gives each dock its own proxy of the viewer (PublicOnlyProxy): key by the viewer itself
    return id(getattr(viewer, "__wrapped__", viewer))


class AnnotatorWidget(QWidget):
    """Dock widget: pick an image and a model, prompt SAM, commit objects, export a dataset.

    The committed objects of each image (each slice of a stack) are autosaved after every
    change, keyed by the image's pixels, and restored when the same image is opened again.

    Public API, for the fine-tune dock: :attr:`model_source`, :meth:`load_model`,
    :attr:`model_changed`, :meth:`annotated_images`, :meth:`embedding_source`.
    """

    model_changed = Signal(str)
    """Emitted with the model source once a model is loaded."""

    def __init__(self, napari_viewer: napari.viewer.Viewer, cache_dir: Path | None = None) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.session = SamSession(cache_dir)
        self.store = AnnotationStore(cache_dir)
        self.history = CommitHistory()
        self._channels: ImageChannels | None = None
        self._plane_index: tuple[int, ...] = ()
        self._plane_key: str | None = None
        self._image_layer: Image | None = None  # the layer whose pixels and transform the annotation follows
        self._images: dict[str, AnnotatedImage] = {}  # every image annotated in this dock, by its chooser entry
        self._annotated_key = ""  # the chooser entry (and first-axis reading) of the annotated image
        self._worker = None
        self._has_automatic = False  # the automatic segmentation layer holds a result not yet committed
        self._after_worker: Callable[[], None] | None = None  # what a finished worker's result asked for next
        self._progress = _Progress()
        self._progress.changed.connect(self._show_progress)
        self._progress.status.connect(self._say)
        self._autosave_timer = QTimer(self, singleShot=True, interval=_AUTOSAVE_DELAY_MS)
        self._autosave_timer.timeout.connect(self._autosave)

        self.layers = AnnotatorLayers(napari_viewer, on_taken=self._layer_taken)
        self._build_ui()
        self._bind_keys()
        self.layers.create_missing()  # now, once: adding a layer stalls napari 0.2-0.6 s once a large image is open
        self.viewer.layers.events.inserted.connect(self._on_layer_inserted)
        self.viewer.layers.events.removed.connect(self._refresh_image_choices)
        self.viewer.dims.events.current_step.connect(self._on_slice_change)
        self._refresh_image_choices()
        self._place_layers()
        self._update_buttons()
        _ANNOTATORS[_viewer_key(napari_viewer)] = self

    # ------------------------------------------------------------------ public API
    @property
    def model_source(self) -> str | None:
        """The loaded model's source (a zoo name, a path, ``random:<type>``), None before one is loaded."""
        return self.session.model.source if self.session.model is not None else None

    @property
    def busy(self) -> bool:
        """Whether a background task (model loading, embeddings, export, ...) is running."""
        return self._worker is not None

    def annotated_images(self) -> list[AnnotatedImage]:
        """Every image annotated in this dock (all slices of a stack), for export.

        Saves the shown slice's objects first, so the export reads what the user sees.
        """
        self._autosave()
        if self._channels is not None:
            try:
                sam_channels = self.image.sam_channels()
            except ImageError:
                sam_channels = self._images[self._annotated_key].sam_channels
            self._images[self._annotated_key] = AnnotatedImage(self._channels, self._image_layer.name, sam_channels)
        return list(self._images.values())

    def embedding_source(self) -> EmbeddingSource | None:
        """Where this dock's embeddings are cached and which encoder made them; None without a model."""
        model = self.session.model
        return EmbeddingSource(self.session.cache_dir, model.encoder_fingerprint) if model is not None else None

    # ------------------------------------------------------------------ UI
    def _build_ui(self) -> None:
        # the boxes scroll when the dock is short (a laptop's screen, the fine-tune dock under it);
        # the progress bar and the status line below them stay in view
        outer = QVBoxLayout(self)
        content = QWidget()
        layout = QVBoxLayout(content)
        layout.setContentsMargins(0, 0, 0, 0)
        self.scroll_area = ContentScroll(content)
        outer.addWidget(self.scroll_area)

        self.image = ImageChooser(self.viewer)
        self.image.chosen.connect(self._place_layers)
        self.image.message.connect(self._say)
        self.series = SeriesPanel(self)
        self.image.channels_changed.connect(self.series.refresh)
        self.image.add_row("Series", self.series)
        layout.addWidget(self.image)

        self.model_panel = ModelPanel()
        self.session.device = self.model_panel.device_combo.currentText()  # the fastest there is
        self.model_panel.device_chosen.connect(self._on_device_choice)
        self.model_panel.load_requested.connect(lambda: self.load_model())
        layout.addWidget(self.model_panel)

        self.segment_panel = SegmentPanel({
            "embed": self.compute_embeddings, "segment": self.segment, "commit": self.commit,
            "toggle": self.toggle_prompt_mode, "clear": self.clear_prompts, "undo": self.undo,
            "automatic": self.automatic_segmentation, "commit_automatic": self.commit_automatic,
        })
        layout.addWidget(self.segment_panel)

        self.export_panel = ExportPanel()
        self.export_panel.export_requested.connect(self.export)
        layout.addWidget(self.export_panel)

        self.progress_bar = QProgressBar(visible=False)
        outer.addWidget(self.progress_bar)
        self.status = QLabel("Open an image, choose a model, then compute embeddings.", wordWrap=True)
        self.status.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        outer.addWidget(self.status)
        outer.addStretch(1)
        self._set_prompt_mode(POSITIVE)

    def _bind_keys(self, target=None) -> None:
        """Bind the shortcuts on the viewer, or on one of our layers (``target``).

        Layer bindings win over the viewer's while that layer is active, and napari's own layer
        shortcuts use S (Points, Shapes) and T (Shapes); so our own layers get the shortcuts too,
        overriding those defaults there (the layer controls still offer the same modes).
        """
        actions = {
            "segment": self.segment, "commit": self.commit, "toggle": self.toggle_prompt_mode,
            "clear": self.clear_prompts, "undo": self.undo, "automatic": self.automatic_segmentation,
            "next": self.series.next, "previous": self.series.previous, "suggested": self.series.suggested,
        }
        for action, slot in actions.items():
            (target or self.viewer).bind_key(SHORTCUTS[action], lambda _source, slot=slot: slot(), overwrite=True)

    def _update_buttons(self) -> None:
        busy = self._worker is not None
        self.model_panel.set_busy(busy)
        self.segment_panel.set_state(
            busy=busy, has_image=self.image.has_choices(), has_embeddings=self.session.image_shape is not None,
            has_automatic=self._has_automatic, can_undo=self.history.can_undo,
        )
        self.export_panel.button.setEnabled(not busy and self._plane_key is not None)

    def _say(self, text: str) -> None:
        self.status.setText(text)

    # ------------------------------------------------------------------ image choice
    def _on_layer_inserted(self, event) -> None:
        image = event.value if isinstance(event.value, Image) else None
        if image is not None:
            self.layers.keep_on_top()
            if sum(isinstance(layer, Image) for layer in self.viewer.layers) == 1:
                # napari frames the first layer added and shows a stack's middle slice; ours came
                # first, so do that for the first image, once the dock's new contents are laid out
                # (they may narrow the canvas)
                self.viewer.dims.current_step = [(steps - 1) // 2 for steps in self.viewer.dims.nsteps]
                QTimer.singleShot(0, self.viewer.reset_view)
        self._refresh_image_choices()
        if image is None:
            return
        if "hpa_fields" in image.metadata and self._channels is None:  # an HPA field from our reader
            self.image.choose_field_of(image)
        self._place_layers()

    def _refresh_image_choices(self, event=None) -> None:
        if self._image_layer is not None and self._image_layer not in self.viewer.layers:
            self._forget_image()
        self.image.refresh()

    def _place_layers(self) -> None:
        """Align our layers with the chosen image, so that prompts can be placed on it at once."""
        chosen = self.image.chosen_layers()
        if self._channels is None and chosen:  # else an image is being annotated: the layers follow it
            self.layers.place(chosen[0])

    # ------------------------------------------------------------------ model
    def load_model(self, source: str | None = None) -> None:
        """Load ``source`` (default: the chosen model) in the background; embeddings are recomputed
        only when the image encoder changed. :attr:`model_changed` tells when it is loaded."""
        if source is not None:
            self.model_panel.combo.setCurrentText(source)
        source = self.model_panel.source()
        if not source:
            self._say("type or choose a model first")
            return
        had_image = self.session.image_shape is not None
        self._start(
            f"loading model {source}…",
            lambda progress: self.session.set_model(source),
            lambda kept: self._model_loaded(kept, had_image),
        )

    def _on_device_choice(self, device: str) -> None:
        self.session.device = device
        if self.session.model is not None:
            self.load_model(self.session.model.source)  # the loaded model moves there

    def _model_loaded(self, kept: bool, had_image: bool) -> None:
        model = self.session.model
        uses_decoder = self.session.automatic_mode == AIS
        method = "its instance decoder" if uses_decoder else "a point grid"
        self.model_panel.show_loaded(model.model_type, model.source, self.session.device, method)
        self.segment_panel.show_automatic_method(uses_decoder)
        if kept and had_image:
            self._say("model loaded; its image encoder is unchanged, so the embeddings were kept")
        elif had_image:
            self._say("model loaded; its image encoder differs, recomputing the embeddings…")
            self._after_worker = self.compute_embeddings
        else:
            self._say("model loaded; now compute embeddings [or press a Segment shortcut after that]")
        self.model_changed.emit(model.source)

    # ------------------------------------------------------------------ embeddings
    def compute_embeddings(self) -> None:
        """Read the current image (slice), restore its autosaved objects, and embed it in the background.

        Reading the plane, scaling it for SAM, hashing it and loading its saved objects take
        seconds for a large image, so all of it runs in the worker; meanwhile the committed
        objects shown (still the previous plane's) cannot be edited.
        """
        if self._worker is not None:
            return
        if self.session.model is None:
            self._say("choose a model and press Load model first")
            return
        try:
            channels, layer, index = self.image.shown_plane()
            sam_channels = self.image.sam_channels()
        except ImageError as error:
            self._say(str(error))
            return
        ready = self.series.take(index, sam_channels)  # read, checked and embedded ahead by the series row
        self._autosave()
        self._set_editable(False)
        session, store, status = self.session, self.store, self._progress.status

        def read_and_embed(progress) -> tuple[PreparedPlane, np.ndarray | None, int]:
            prepared = ready or prepare_plane(channels, index, sam_channels, layer.name)
            saved = store.load(prepared.key, channels.shape)
            objects = object_count(saved) if saved is not None else 0
            status.emit("loading cached embeddings…" if session.is_cached(prepared.rgb) else "computing embeddings…")
            session.set_image(prepared.rgb, progress)
            return prepared, saved, objects

        self._start("reading the image…", read_and_embed, lambda result: self._embeddings_ready(channels, index, layer, *result))

    def _switch_plane(
        self, channels: ImageChannels, index: tuple[int, ...], layer: Image, key: str, saved: np.ndarray | None, objects: int
    ) -> None:
        """Make ``key``'s plane the annotated one, showing ``saved``, its autosaved labels (None: none)
        holding ``objects`` objects."""
        previous = self._layer(COMMITTED_LAYER)
        # one scan of the objects shown until now serves the autosave and the layer (~25 ms at 10,000 x 10,000)
        showing_objects = previous is not None and bool(previous.data.any())
        self._autosave(has_objects=showing_objects)
        self._channels, self._plane_index, self._plane_key, self._image_layer = channels, index, key, layer
        self._annotated_key = self.image.key()
        self._images[self._annotated_key] = AnnotatedImage(channels, layer.name, self.image.sam_channels())
        self.history.clear()
        height, width = channels.shape
        committed = saved if saved is not None else np.zeros((height, width), np.uint32)
        self._ensure_layers(layer, committed, replace=showing_objects or objects > 0)
        self.clear_prompts()
        self.series.plane_switched(index, objects > 0)

    def _set_editable(self, editable: bool) -> None:
        committed = self._layer(COMMITTED_LAYER)
        if committed is not None:
            committed.editable = editable and self._plane_key is not None  # nothing to paint on before a plane is read

    def _forget_image(self) -> None:
        """The annotated image was closed: its objects are saved; nothing refers to it any more."""
        self._autosave()
        self.session.reset_image()
        self.history.clear()
        self._channels, self._plane_index, self._plane_key, self._image_layer = None, (), None, None
        self._update_buttons()

    def _embeddings_ready(
        self, channels: ImageChannels, index: tuple[int, ...], layer: Image,
        prepared: PreparedPlane, saved: np.ndarray | None, objects: int,
    ) -> None:
        restored = ""
        if prepared.key != self._plane_key:  # else the same plane again (another model): its layers are as they were
            self._switch_plane(channels, index, layer, prepared.key, saved, objects)
            restored = f"restored {objects} autosaved objects; " if saved is not None else ""
        height, width = self.session.image_shape
        tiled = " (tiled)" if self.session.tiled else ""
        self._say(
            f"{restored}embeddings ready for {height} x {width}{tiled}. Click cells in '{POINTS_LAYER}' "
            f"({SHORTCUTS['toggle']} switches positive/negative) or draw boxes in '{BOXES_LAYER}', "
            f"then Segment [{SHORTCUTS['segment']}] and Commit [{SHORTCUTS['commit']}]"
        )
        self.layers.create_missing()  # one the user deleted comes back
        self.viewer.layers.selection.active = self._layer(POINTS_LAYER)
        self._layer(POINTS_LAYER).mode = "add"
        self.series.refresh()  # now the next image can be made ready

    def _on_slice_change(self, event=None) -> None:
        """In a stack, moving to another slice annotates that slice (its embeddings load or compute)."""
        self.series.refresh()
        if self._channels is None or not self._channels.stack_shape or self._image_layer is None:
            return
        if self.image.stack_index(self._channels, self._image_layer) != self._plane_index and self._worker is None:
            self.compute_embeddings()

    # ------------------------------------------------------------------ layers
    def _layer(self, name: str):
        return self.layers.get(name)

    def _ensure_layers(self, image: Image, committed: np.ndarray, replace: bool) -> None:
        self.layers.ensure(image, committed, replace)
        self._has_automatic = False
        self._set_prompt_mode(self._prompt_mode)

    def _layer_taken(self, name: str, layer) -> None:
        self._bind_keys(layer)
        if name == COMMITTED_LAYER:
            layer.events.paint.connect(lambda event: self._autosave_timer.start())

    # ------------------------------------------------------------------ prompts
    def _set_prompt_mode(self, mode: str) -> None:
        self._prompt_mode = mode
        self.layers.set_prompt_kind(mode)
        self.segment_panel.show_prompt_mode(mode)

    def toggle_prompt_mode(self) -> None:
        """Switch the next points between positive (on the object) and negative (not on it)."""
        self._set_prompt_mode(NEGATIVE if self._prompt_mode == POSITIVE else POSITIVE)

    def segment(self) -> None:
        """Show the objects SAM proposes for the current points and boxes in the current-object layer.

        Runs in the background, even for one object (0.1-0.2 s with vit_t on a CPU): the viewer
        stays responsive, and a prompt added meanwhile is answered by the next Segment."""
        if self._worker is not None:
            return  # busy: the task running says so in the status line
        if self.session.image_shape is None:
            self._say("compute the embeddings first")
            return
        try:
            objects = object_prompts(self.layers.prompts(), self.segment_panel.batched())
        except PromptError as error:
            self._say(str(error))
            return
        if not objects:
            self._say("add a positive point or a box first")
            return

        def propose(progress) -> tuple[np.ndarray, tuple[int, int], str]:
            # cropped to the objects, and uint8 while it fits: what napari copies and draws, not the whole image
            labels, origin = crop_to_objects(self.session.segment_objects(objects, progress))
            return labels.astype(np.uint8) if labels.max() < 256 else labels, origin, proposal_message(labels)

        self._start(f"segmenting {len(objects)} object{'s' if len(objects) > 1 else ''}…", propose, self._show_proposal)

    def _show_proposal(self, proposal: tuple[np.ndarray, tuple[int, int], str]) -> None:
        labels, origin, message = proposal
        self.layers.show(CURRENT_LAYER, labels, origin)
        self._say(message)

    def clear_prompts(self) -> None:
        """Drop all points, boxes and the shown object."""
        self.layers.clear_prompts()

    def commit(self) -> None:
        """Write the shown objects into the committed objects, each with a new id (one undo step),
        then clear the prompts."""
        current = self._layer(CURRENT_LAYER)
        if current is None or not current.data.any():
            self._say(f"nothing to commit: Segment [{SHORTCUTS['segment']}] an object first")
            return
        committed = self._layer(COMMITTED_LAYER)
        try:
            ids = self.history.commit_labels(committed.data, current.data, self.layers.origin(CURRENT_LAYER))
        except CommitError as error:
            self._say(str(error))
            return
        self.layers.redraw(COMMITTED_LAYER, self.history.last_box)
        self.clear_prompts()
        self._autosave(has_objects=True)
        self._say(f"committed object {ids[0]}" if len(ids) == 1 else f"committed {len(ids)} objects ({ids[0]}–{ids[-1]})")
        self._update_buttons()

    def undo(self) -> None:
        """Take back the last commit (one object, or a whole automatic segmentation)."""
        committed, box = self._layer(COMMITTED_LAYER), self.history.last_box
        removed = self.history.undo(committed.data) if committed is not None else []
        if not removed:
            self._say("nothing to undo")
            return
        self.layers.redraw(COMMITTED_LAYER, box)
        self._autosave()
        self._say(f"undone: {len(removed)} object{'s' if len(removed) > 1 else ''} removed")
        self._update_buttons()

    # ------------------------------------------------------------------ automatic segmentation
    def automatic_segmentation(self) -> None:
        """Segment every object of the image in the background into its own layer."""
        if self._worker is not None or self.session.image_shape is None:
            self._say("compute the embeddings first")
            return
        settings = self.segment_panel.automatic_values()

        def segment_all(progress) -> tuple[np.ndarray, int]:
            labels = self.session.automatic_segmentation(progress, **settings)
            return labels, object_count(labels)

        self._start("automatic segmentation…", segment_all, self._automatic_ready)

    def _automatic_ready(self, result: tuple[np.ndarray, int]) -> None:
        labels, count = result
        self.layers.show(AUTOMATIC_LAYER, labels)
        self._has_automatic = True
        self._say(f"automatic segmentation: {count} objects. Commit all keeps them (one undo step)")

    def commit_automatic(self) -> None:
        """Commit every object of the automatic segmentation, as one undo step."""
        automatic, committed = self._layer(AUTOMATIC_LAYER), self._layer(COMMITTED_LAYER)
        if not self._has_automatic:
            self._say("run Automatic segmentation first")
            return
        try:
            ids = self.history.commit_labels(committed.data, np.asarray(automatic.data, np.uint32))
        except CommitError as error:
            self._say(str(error))
            return
        self.layers.redraw(COMMITTED_LAYER, self.history.last_box)
        self.layers.clear(AUTOMATIC_LAYER)
        self._has_automatic = False
        self._autosave(has_objects=True)
        self._say(f"committed {len(ids)} objects from the automatic segmentation")
        self._update_buttons()

    # ------------------------------------------------------------------ saving and export
    def _autosave(self, has_objects: bool | None = None) -> None:
        """Save the committed objects in the background; ``has_objects``, when known, spares the series
        row's count a scan of every pixel (~30 ms at 10,000 x 10,000 on napari's thread)."""
        committed = self._layer(COMMITTED_LAYER)
        if self._plane_key is None or committed is None:
            return
        labels, root, status = committed.data, self.store.root, self._progress.status

        def failed(error: Exception) -> None:  # on the autosave thread: the signal takes it to the GUI's
            status.emit(f"could not autosave the annotations ({plain_reason(error)}): free disk space or check {root}")

        self.store.save_in_background(self._plane_key, labels, source=self._image_layer.name, failed=failed)
        self.series.annotations_saved(self._plane_index, bool(labels.any()) if has_objects is None else has_objects)

    def export(self) -> None:
        """Write every annotated image (each slice of a stack) of this dock into the dataset, in the
        chosen split; an image exported before is updated, never added twice."""
        path = self.export_panel.dataset()
        if not path:
            self._say("type a dataset path (a .zarr folder) to export to")
            return
        if self._channels is None or self._plane_key is None:
            self._say("nothing to export yet: compute embeddings and commit objects first")
            return
        try:
            self.image.sam_channels()
        except ImageError as error:
            self._say(str(error))
            return
        images, split, embeddings = self.annotated_images(), self.export_panel.split(), self.embedding_source()
        self._start(
            f"exporting to {path}…",
            lambda progress: export_annotations(
                images, path, self.store, split=split, embeddings=embeddings, progress=progress
            ),
            lambda result: self._say(f"exported to {path} ({split}): {result.summary()}"),
        )

    # ------------------------------------------------------------------ workers
    def _start(self, message: str, task: Callable[[ProgressCallback], Any], done: Callable[[Any], None]) -> None:
        """Run ``task(progress)`` in a worker thread; ``done(result)`` runs on the GUI thread after it."""
        self._say(message)
        self.progress_bar.setRange(0, 0)  # busy until the task reports its first (done, total)
        self.progress_bar.setVisible(True)
        report = self._progress.changed.emit

        def progress(done: int, total: int) -> None:
            stop_if_closing()  # napari was closed: a long embedding stops at its next tile
            report(done, total)

        self._worker = start_task(task, progress, done=done, failed=self._failed, finished=self._finished)
        self._update_buttons()

    def _show_progress(self, done: int, total: int) -> None:
        self.progress_bar.setRange(0, max(total, 1))
        self.progress_bar.setValue(done)

    def _failed(self, error: Exception) -> None:
        self._say(failure_message(error, _USER_ERRORS, "annotator"))

    def _finished(self) -> None:
        self._worker = None
        self._set_editable(True)  # locked while a plane was read: that plane, or (on failure) the previous one, is shown
        self.progress_bar.setVisible(False)
        self._update_buttons()
        follow_up, self._after_worker = self._after_worker, None
        if follow_up is not None:
            follow_up()
        else:
            self._on_slice_change()  # the slider may have moved while the worker ran
