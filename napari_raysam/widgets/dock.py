"""The docks as napari's Plugins menu opens them: without freezing napari while PyTorch loads.

napari imports a dock's module on its GUI thread when the user opens the dock; ours bring in
PyTorch, segment-anything and micro-sam, which held napari frozen for ~5 s (2-core machine).
The manifest therefore names these light classes: each is a :class:`LoadingDock` that
imports the dock's module in a worker thread, shows a busy bar meanwhile and then holds the real
dock (:attr:`LoadingDock.widget`). Where the module is already imported (the other dock brought
it in, or a script did), the real dock is built at once.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import sys
import threading
from collections.abc import Callable
from types import ModuleType

import napari
from qtpy.QtCore import QTimer, Signal
from qtpy.QtWidgets import QLabel, QProgressBar, QSizePolicy, QVBoxLayout, QWidget

from napari_raysam.widgets.tasks import failure_message

_EXPANDING = (QSizePolicy.Policy.Expanding, QSizePolicy.Policy.MinimumExpanding, QSizePolicy.Policy.Ignored)
_BROKEN_INSTALL = (ImportError, OSError)  # a missing package or library: reinstalling mends it


def import_without_collections(module: str) -> ModuleType:
    """``importlib.import_module(module)`` with Python's cyclic garbage collector paused meanwhile,
    and one full collection after it, here, before the dock is built.

    Importing PyTorch and micro-sam creates ~600k long-lived objects. With the collector on, the
    heap's growth set off six full collections (0.2-0.5 s each, every thread held) during the
    import; paused, the pile of new objects was walked three times later (a young collection, a
    middle and a full one, 0.4-0.7 s each), two of them while napari built the dock. One full
    collection here moves them all to the oldest generation at once.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        imported = importlib.import_module(module)
    finally:
        if enabled:
            gc.enable()
    gc.collect()
    return imported


def _wants_height(widget: QWidget) -> bool:
    """napari's rule for a dock's widget (``QtViewerDockWidget._maybe_add_vertical_stretch``): it fills the
    dock's height when it or one of its layout's widgets has an expanding vertical size policy."""
    layout = widget.layout()
    parts = [widget] + ([layout.itemAt(i).widget() for i in range(layout.count())] if layout is not None else [])
    return any(part is not None and part.sizePolicy().verticalPolicy() in _EXPANDING for part in parts)


class LoadingDock(QWidget):
    """Holds ``module.class_name(viewer)`` once ``module`` is imported (in a thread when it is not yet)."""

    _imported = Signal(object)  # the module, or the import's exception

    def __init__(self, viewer: napari.viewer.Viewer, module: str, class_name: str) -> None:
        super().__init__()
        self.viewer, self._class_name = viewer, class_name
        self.widget: QWidget | None = None
        self._layout = QVBoxLayout(self)
        self._layout.setContentsMargins(0, 0, 0, 0)
        if module in sys.modules:
            self._build(sys.modules[module])
            return
        # as wide as our docks ask to be (~500 px): napari sizes the dock for the placeholder, and
        # keeps that width when the real widget takes its place
        placeholder = QWidget(minimumWidth=500)
        column = QVBoxLayout(placeholder)
        self._message = QLabel("Loading PyTorch and Segment Anything, once per napari session; "
                               "napari stays usable meanwhile.", wordWrap=True)
        self._busy = QProgressBar(minimum=0, maximum=0, textVisible=False)  # no known length: a busy bar
        column.addWidget(self._message)
        column.addWidget(self._busy)
        column.addStretch(1)
        self._layout.addWidget(placeholder)
        self._module: ModuleType | None = None
        self._steps: list[Callable[[], None]] = []
        self._turns = QTimer(self, singleShot=True, interval=0)  # a child: it dies with the dock (napari closed)
        self._turns.timeout.connect(self._take_turn)
        self._imported.connect(self._on_imported)
        # A Python thread, not napari's thread pool: Python waits for it when napari closes meanwhile,
        # where tearing down under a pool worker aborted the process.
        threading.Thread(target=self._import, args=(module,), name=f"import {module}").start()

    def _import(self, module: str) -> None:  # in the import thread
        try:
            result = import_without_collections(module)
            self._warm_up(result)
        except Exception as error:  # noqa: BLE001 - shown in the dock
            result = error
        with contextlib.suppress(RuntimeError):  # the dock was closed meanwhile
            self._imported.emit(result)

    def _on_imported(self, result: ModuleType | Exception) -> None:
        if isinstance(result, Exception):
            self._failed(result)
        else:  # napari draws and answers between the import's collection, each step and the build
            self._module, self._steps = result, self._steps_before_build(result)
            self._turns.start()

    def _warm_up(self, module: ModuleType) -> None:
        """What the import thread does after the import, for napari's thread to do less (here: nothing)."""

    def _steps_before_build(self, module: ModuleType) -> list[Callable[[], None]]:
        """Work for napari's thread before the dock is built, one step per turn of its event loop (here: none)."""
        return []

    def _take_turn(self) -> None:
        if self._steps:
            self._steps.pop(0)()
            self._turns.start()
        else:
            self._build(self._module)

    def _build(self, module: ModuleType) -> None:
        while self._layout.count():  # the placeholder, and the stretch napari put under it
            placeholder = self._layout.takeAt(0).widget()
            if placeholder is not None:
                placeholder.deleteLater()
        self.widget = getattr(module, self._class_name)(self.viewer)
        self._layout.addWidget(self.widget)
        if not _wants_height(self.widget):  # then napari would have put a stretch under it
            self._layout.addStretch(1)

    def _failed(self, error: Exception) -> None:
        self._busy.hide()
        message = failure_message(error, _BROKEN_INSTALL, "loading the dock")
        if isinstance(error, _BROKEN_INSTALL):
            message = (f"could not load PyTorch or Segment Anything ({message}): reinstall napari-raysam "
                       "(bash scripts/setup.sh) and restart napari")
        self._message.setText(message)


class AnnotatorDock(LoadingDock):
    """The "SAM annotator" dock (:class:`napari_raysam.widgets.annotator.AnnotatorWidget`).

    Its five layers are made before it is built, one per turn of napari's event loop, with napari's
    labels colouring made ready in the import thread: built at once, they held napari ~1 s.
    """

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__(napari_viewer, "napari_raysam.widgets.annotator", "AnnotatorWidget")

    def _warm_up(self, module: ModuleType) -> None:
        from napari_raysam.widgets.annotator_layers import warm_up_labels

        warm_up_labels()

    def _steps_before_build(self, module: ModuleType) -> list[Callable[[], None]]:
        from napari_raysam.widgets.annotator_layers import AnnotatorLayers

        return AnnotatorLayers(self.viewer, on_taken=lambda name, layer: None).creation_steps()


class FinetuneDock(LoadingDock):
    """The "Fine-tune" dock (:class:`napari_raysam.widgets.finetune.FinetuneWidget`)."""

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__(napari_viewer, "napari_raysam.widgets.finetune", "FinetuneWidget")
