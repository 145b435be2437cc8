"""The annotator's automatic-segmentation settings: the thresholds users change, in a popup.

A popup (a ⚙ button beside *Automatic segmentation*) rather than a fold in the dock: unfolded
rows would squeeze the dock's buttons on a short screen. The values are
:meth:`SamSession.automatic_segmentation`'s keyword arguments, with its defaults (micro-sam's);
the point grid's size stays in the dock's row beside the button, as before.
"""

from __future__ import annotations

from qtpy.QtWidgets import QDoubleSpinBox, QFormLayout, QMenu, QSpinBox, QToolButton, QWidget, QWidgetAction

# keyword, label, tooltip, used by the instance decoder (True) or the point grid (False), default
_THRESHOLDS = (
    ("pred_iou_thresh", "Predicted IoU ≥", "Point grid: keep masks SAM itself rates at least this good (0–1); lower finds more, and worse, objects", False, 0.88),
    ("stability_score_thresh", "Stability ≥", "Point grid: keep masks that change little when the mask threshold moves (0–1)", False, 0.95),
    ("center_distance_threshold", "Centre distance <", "Instance decoder: seeds are where the predicted distance to an object's centre is below this (0–1); higher gives more seeds", True, 0.5),
    ("boundary_distance_threshold", "Boundary distance <", "Instance decoder: seeds are where the predicted distance to the boundary is below this (0–1)", True, 0.5),
)


class AutomaticSettings:
    """The settings form, shown by :attr:`button` as a popup; the form exists (and keeps its
    values) while the popup is closed."""

    def __init__(self) -> None:
        self.form = QWidget()
        layout = QFormLayout(self.form)
        self.spins: dict[str, QDoubleSpinBox | QSpinBox] = {}
        self._for_decoder: dict[str, bool | None] = {}
        for keyword, label, tip, for_decoder, default in _THRESHOLDS:
            spin = QDoubleSpinBox(minimum=0.0, maximum=1.0, singleStep=0.01, decimals=2, value=default, toolTip=tip)
            self._add(layout, keyword, label, spin, for_decoder)
        size = QSpinBox(minimum=0, maximum=1_000_000, singleStep=10, value=0, suffix=" px", toolTip="Drop objects of fewer pixels (0 keeps all)")
        self._add(layout, "min_object_size", "Min object size", size, None)
        self.button = QToolButton(text="⚙", toolTip="Automatic segmentation settings: thresholds and the minimum object size")
        menu = QMenu(self.button)
        action = QWidgetAction(menu)
        action.setDefaultWidget(self.form)
        menu.addAction(action)
        self.button.setMenu(menu)
        self.button.setPopupMode(QToolButton.ToolButtonPopupMode.InstantPopup)

    def _add(self, layout: QFormLayout, keyword: str, label: str, spin, for_decoder: bool | None) -> None:
        layout.addRow(label, spin)
        self.spins[keyword], self._for_decoder[keyword] = spin, for_decoder

    def set_method(self, uses_decoder: bool) -> None:
        """Enable the settings of the method the loaded model segments with."""
        for keyword, spin in self.spins.items():
            spin.setEnabled(self._for_decoder[keyword] in (None, uses_decoder))

    def values(self) -> dict[str, float | int]:
        """The settings as ``SamSession.automatic_segmentation``'s keyword arguments."""
        return {keyword: spin.value() for keyword, spin in self.spins.items()}
