"""The annotator dock's "Segment" box: embeddings, prompts, Segment / Commit / Undo, automatic segmentation.

The box holds the buttons and the settings the user changes; pressing one calls the dock's action
given for it (:mod:`napari_raysam.widgets.annotator` does the work). :data:`SHORTCUTS` are the
dock's keys, shown in the buttons' tooltips and bound by the dock on the viewer and its layers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from qtpy.QtWidgets import QCheckBox, QGroupBox, QHBoxLayout, QLabel, QPushButton, QSpinBox, QVBoxLayout

from napari_raysam.annotator.prompts import POSITIVE
from napari_raysam.widgets import annotator_series
from napari_raysam.widgets.annotator_automatic import AutomaticSettings

SHORTCUTS = {
    "segment": "S",
    "commit": "C",
    "toggle": "T",
    "clear": "Shift-C",
    "undo": "U",
    "automatic": "Shift-A",
    **annotator_series.SHORTCUTS,
}


class SegmentPanel(QGroupBox):
    """Buttons and settings of interactive and automatic segmentation.

    ``actions``: the dock's slot for each button: ``embed``, ``segment``, ``commit``, ``toggle``,
    ``clear``, ``undo``, ``automatic``, ``commit_automatic``.
    """

    def __init__(self, actions: Mapping[str, Callable[[], Any]]) -> None:
        super().__init__("Segment")
        layout = QVBoxLayout(self)
        self.embed_button = QPushButton("Compute embeddings", toolTip="Run SAM's image encoder on the current image (cached on disk)")
        self.embed_button.clicked.connect(actions["embed"])
        layout.addWidget(self.embed_button)
        row = QHBoxLayout()
        self.prompt_mode_label = QLabel()
        row.addWidget(self.prompt_mode_label, stretch=1)
        self.batched_check = QCheckBox("Batched", toolTip=(
            "Segment many objects at once: every box and every positive point is an object of its own; "
            "negative points apply to all. Unticked, boxes without points are still one object each"
        ))
        row.addWidget(self.batched_check)
        layout.addLayout(row)
        row = QHBoxLayout()
        self.segment_button = _button(row, "Segment", "segment", "Show the objects for the current prompts", actions)
        self.commit_button = _button(row, "Commit", "commit", "Add the shown objects to the committed objects, each with a new id", actions)
        layout.addLayout(row)
        row = QHBoxLayout()
        self.toggle_button = _button(row, "Positive/negative", "toggle", "Switch the next points between positive and negative", actions)
        self.clear_button = _button(row, "Clear", "clear", "Remove all prompts and the shown object", actions)
        self.undo_button = _button(row, "Undo", "undo", "Take back the last commit", actions)
        layout.addLayout(row)
        row = QHBoxLayout()
        self.automatic_button = _button(row, "Automatic segmentation", "automatic", "Segment every object in the image (runs in the background)", actions)
        self.grid_spin = QSpinBox(minimum=4, maximum=64, value=32, toolTip=(
            "Grid points per side for automatic segmentation: more finds smaller objects, fewer is faster"
        ))
        row.addWidget(self.grid_spin)
        self.automatic_settings = AutomaticSettings()
        row.addWidget(self.automatic_settings.button)
        self.commit_automatic_button = QPushButton("Commit all", toolTip="Commit every object of the automatic segmentation (one undo step)")
        self.commit_automatic_button.clicked.connect(actions["commit_automatic"])
        row.addWidget(self.commit_automatic_button)
        layout.addLayout(row)

    def batched(self) -> bool:
        """Whether every box and positive point is an object of its own."""
        return self.batched_check.isChecked()

    def automatic_values(self) -> dict[str, float | int]:
        """The automatic segmentation's settings as ``SamSession.automatic_segmentation``'s keyword arguments."""
        return {"points_per_side": self.grid_spin.value(), **self.automatic_settings.values()}

    def show_prompt_mode(self, mode: str) -> None:
        colour = "green" if mode == POSITIVE else "red"
        self.prompt_mode_label.setText(f"Next point: <b style='color:{colour}'>{mode}</b>  [{SHORTCUTS['toggle']} switches]")

    def show_automatic_method(self, uses_decoder: bool) -> None:
        """Enable the settings of the loaded model's automatic method (the instance decoder needs no grid)."""
        self.grid_spin.setEnabled(not uses_decoder)
        self.automatic_settings.set_method(uses_decoder)

    def set_state(self, *, busy: bool, has_image: bool, has_embeddings: bool, has_automatic: bool, can_undo: bool) -> None:
        """Enable what can be pressed now (nothing but the settings while a background task runs)."""
        self.embed_button.setEnabled(not busy and has_image)
        for button in (self.segment_button, self.commit_button, self.automatic_button):
            button.setEnabled(not busy and has_embeddings)
        self.commit_automatic_button.setEnabled(not busy and has_automatic)
        self.undo_button.setEnabled(not busy and can_undo)


def _button(row: QHBoxLayout, text: str, action: str, tip: str, actions: Mapping[str, Callable[[], Any]]) -> QPushButton:
    button = QPushButton(text, toolTip=f"{tip} [{SHORTCUTS[action]}]")
    button.clicked.connect(actions[action])
    row.addWidget(button)
    return button
