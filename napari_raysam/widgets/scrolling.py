"""A dock's contents in a scroll area: as tall as they are where there is room, scrolling where there is not.

napari stacks our two docks in one column and does not scroll a dock. Without a scroll area, the
annotator's boxes asked for 630 px, so on a laptop's 768 px screen, with the fine-tune dock under it,
napari's window grew past the screen's bottom edge (its own status bar off screen).
"""

from __future__ import annotations

from qtpy.QtCore import QEvent, QObject, QSize
from qtpy.QtWidgets import QFrame, QScrollArea, QSizePolicy, QWidget


class ContentScroll(QScrollArea):
    """A frameless scroll area around ``content`` that asks for the content's own size.

    Qt's scroll area asks for at most ~24 lines of text, and a dock then scrolls with room to
    spare; this one asks for the content's whole height and may be squeezed down to a few lines
    (a vertical scroll bar then appears), never narrower than the content (no horizontal one).
    """

    def __init__(self, content: QWidget) -> None:
        super().__init__(widgetResizable=True, frameShape=QFrame.Shape.NoFrame)
        self.setWidget(content)
        self.setSizePolicy(QSizePolicy.Policy.Preferred, QSizePolicy.Policy.Preferred)
        content.installEventFilter(self)

    def eventFilter(self, watched: QObject, event: QEvent) -> bool:
        if watched is self.widget() and event.type() == QEvent.Type.LayoutRequest:
            self.updateGeometry()  # the content's size changed: so does the size this asks for
        return super().eventFilter(watched, event)

    def sizeHint(self) -> QSize:
        content = self.widget().sizeHint().expandedTo(self.widget().minimumSizeHint())
        return QSize(content.width() + self._beside(), content.height() + 2 * self.frameWidth())

    def minimumSizeHint(self) -> QSize:
        return QSize(self.widget().minimumSizeHint().width() + self._beside(), super().minimumSizeHint().height())

    def _beside(self) -> int:
        """Width beside the content: the vertical scroll bar and the frame (napari's style draws one)."""
        return self.verticalScrollBar().sizeHint().width() + 2 * self.frameWidth()
