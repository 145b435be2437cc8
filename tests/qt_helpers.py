"""What the dock tests do to and check of Qt widgets, as a user meets them."""

from __future__ import annotations

from qtpy.QtCore import Qt
from qtpy.QtWidgets import QAbstractButton, QWidget


def click(qtbot, button: QAbstractButton) -> None:
    """Click ``button`` with the mouse; it must be enabled (a disabled one would ignore the click)."""
    assert button.isEnabled(), button.text()
    qtbot.mouseClick(button, Qt.MouseButton.LeftButton)


def wholly_in_view(widget: QWidget) -> bool:
    """Whether all of ``widget`` is on screen: shown, and neither cut off nor scrolled out of sight."""
    return widget.isVisible() and widget.visibleRegion().boundingRect().size() == widget.size()
