"""The annotator's automatic-segmentation settings: a fold with the thresholds users change.

The values are :meth:`SamSession.automatic_segmentation`'s keyword arguments, with its defaults
(micro-sam's); the point grid's size stays in the dock's row beside the button, as before.
"""

from __future__ import annotations

from qtpy.QtCore import Qt
from qtpy.QtWidgets import QDoubleSpinBox, QFormLayout, QSizePolicy, QSpinBox, QToolButton, QVBoxLayout, QWidget

# (keyword, label, tooltip, used by the instance decoder (True) or the point grid (False) or both (None))
_THRESHOLDS = (
    ("pred_iou_thresh", "Predicted IoU ≥", "Point grid: keep masks SAM itself rates at least this good (0–1); lower finds more, and worse, objects", False, 0.88),
    ("stability_score_thresh", "Stability ≥", "Point grid: keep masks that change little when the mask threshold moves (0–1)", False, 0.95),
    ("center_distance_threshold", "Centre distance <", "Instance decoder: seeds are where the predicted distance to an object's centre is below this (0–1); higher gives more seeds", True, 0.5),
    ("boundary_distance_threshold", "Boundary distance <", "Instance decoder: seeds are where the predicted distance to the boundary is below this (0–1)", True, 0.5),
)


class AutomaticSettings(QWidget):
    """A "Settings" toggle that shows the thresholds and the minimum object size."""

    def __init__(self) -> None:
        super().__init__()
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        self.toggle = QToolButton(text="Automatic segmentation settings", checkable=True, toolTip="Show the thresholds automatic segmentation uses")
        self.toggle.setArrowType(Qt.ArrowType.RightArrow)  # a down arrow once open
        self.toggle.setToolButtonStyle(Qt.ToolButtonStyle.ToolButtonTextBesideIcon)
        self.toggle.toggled.connect(self._show)
        layout.addWidget(self.toggle)
        self.fold = QWidget(visible=False)
        form = QFormLayout(self.fold)
        self.spins: dict[str, QDoubleSpinBox | QSpinBox] = {}
        self._for_decoder: dict[str, bool | None] = {}
        for keyword, label, tip, for_decoder, default in _THRESHOLDS:
            spin = QDoubleSpinBox(minimum=0.0, maximum=1.0, singleStep=0.01, decimals=2, value=default, toolTip=tip)
            self._add(form, keyword, label, spin, for_decoder)
        size = QSpinBox(minimum=0, maximum=1_000_000, singleStep=10, value=0, suffix=" px", toolTip="Drop objects of fewer pixels (0 keeps all)")
        self._add(form, "min_object_size", "Min object size", size, None)
        layout.addWidget(self.fold)
        # its rows keep their height when the dock is short (napari then scrolls the dock), never squeezed
        self.setSizePolicy(QSizePolicy.Policy.Preferred, QSizePolicy.Policy.Fixed)

    def _add(self, form: QFormLayout, keyword: str, label: str, spin, for_decoder: bool | None) -> None:
        form.addRow(label, spin)
        self.spins[keyword], self._for_decoder[keyword] = spin, for_decoder

    def _show(self, shown: bool) -> None:
        self.fold.setVisible(shown)
        self.toggle.setArrowType(Qt.ArrowType.DownArrow if shown else Qt.ArrowType.RightArrow)

    def set_method(self, uses_decoder: bool) -> None:
        """Enable the settings of the method the loaded model segments with."""
        for keyword, spin in self.spins.items():
            spin.setEnabled(self._for_decoder[keyword] in (None, uses_decoder))

    def values(self) -> dict[str, float | int]:
        """The settings as ``SamSession.automatic_segmentation``'s keyword arguments."""
        return {keyword: spin.value() for keyword, spin in self.spins.items()}
