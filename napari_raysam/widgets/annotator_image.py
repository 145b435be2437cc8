"""The annotator's "Image" box: which layer(s) to annotate, how to read them, which channels SAM gets.

Qt over :mod:`napari_raysam.annotator.image_source`, which reads the layers (Qt-free). The box
says what it found in :attr:`ImageChooser.message`, and tells the dock through
:attr:`ImageChooser.chosen` and :attr:`ImageChooser.channels_changed` when to follow.
"""

from __future__ import annotations

import napari
from napari.layers import Image
from qtpy.QtCore import Signal
from qtpy.QtWidgets import QComboBox, QFormLayout, QGroupBox, QHBoxLayout, QPushButton, QWidget

from napari_raysam.annotator.image_source import (
    ImageChannels,
    ImageError,
    first_axis_is_channels,
    last_axis_is_channels,
    sam_channels_choice,
    stack_index,
)
from napari_raysam.widgets.annotator_layers import split_last_axis

_NO_CHANNEL = "—"
_ALL_CHANNEL_LAYERS = "channel layers: "  # prefix of the entry that combines same-shaped layers


def compact_combo(tip: str) -> QComboBox:
    """A combo box that does not widen the dock to its longest entry (layer names, paths can be long)."""
    combo = QComboBox(toolTip=tip)
    combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
    combo.setMinimumContentsLength(6)
    return combo


def _entry_layer_names(entry: str) -> list[str]:
    """The layers an entry of the image list names: one, or all of a combined "channel layers: a + b" entry."""
    if entry.startswith(_ALL_CHANNEL_LAYERS):
        return entry[len(_ALL_CHANNEL_LAYERS):].split(" + ")
    return [entry]


class ImageChooser(QGroupBox):
    """The image layer to annotate (or several same-shaped layers as its channels), whether a
    layer's first axis holds channels or slices, and the 1 or 3 channels fed to SAM."""

    chosen = Signal()
    """Another image was chosen."""
    channels_changed = Signal()
    """The chosen image's channels were listed again (another image, or another reading of it)."""
    message = Signal(str)
    """What the user should know about the choice, in plain words."""

    def __init__(self, viewer: napari.viewer.Viewer) -> None:
        super().__init__("Image")
        self.viewer = viewer
        self._form = QFormLayout(self)
        self.layer_combo = compact_combo("The image layer to annotate")
        self.layer_combo.currentIndexChanged.connect(lambda _index: (self._on_image_choice(), self.chosen.emit()))
        self._form.addRow("Layer", self.layer_combo)
        self.layout_combo = compact_combo("Whether the layer's first axis holds channels or slices")
        self.layout_combo.addItems(["slices (annotate one by one)", "channels"])
        self.layout_combo.currentIndexChanged.connect(lambda _index: self._refresh_channels())
        self.split_button = QPushButton("Split channels", visible=False, toolTip=(
            "This layer looks like (H, W, C) with its channels last, which napari shows as a stack of thin "
            "slices: replace it by one layer per channel, as napari's Split Stack does, and annotate them as one image"
        ))
        self.split_button.clicked.connect(self.split_channels)
        layout_row = QHBoxLayout()
        layout_row.addWidget(self.layout_combo, stretch=1)
        layout_row.addWidget(self.split_button)
        self._form.addRow("First axis", layout_row)
        self.channel_combos = [compact_combo("") for _ in "RGB"]
        channel_row = QHBoxLayout()
        for colour, combo in zip(("red", "green", "blue"), self.channel_combos):
            combo.setToolTip(f"Channel fed to SAM's {colour} input")
            channel_row.addWidget(combo)
        self._form.addRow("SAM R G B", channel_row)

    def add_row(self, label: str, widget: QWidget) -> None:
        """Add a row of the dock's own below the choosers (the series row)."""
        self._form.addRow(label, widget)

    def refresh(self) -> None:
        """List the viewer's image layers again, and every set of 2 or more same-shaped single-channel
        layers as one image; the choice is kept when it is still there."""
        current = self.layer_combo.currentText()
        images = [layer for layer in self.viewer.layers if isinstance(layer, Image)]
        entries = [layer.name for layer in images]
        by_shape: dict[tuple[int, ...], list[Image]] = {}
        for layer in images:
            if not layer.rgb and layer.ndim in (2, 3):  # images or stacks of slices, one channel each
                by_shape.setdefault(tuple(layer.data.shape), []).append(layer)
        for same_shape in by_shape.values():
            if len(same_shape) >= 2:
                entries.append(_ALL_CHANNEL_LAYERS + " + ".join(layer.name for layer in same_shape))
        self.layer_combo.blockSignals(True)
        self.layer_combo.clear()
        self.layer_combo.addItems(entries)
        if current in entries:
            self.layer_combo.setCurrentText(current)
        self.layer_combo.blockSignals(False)
        self._on_image_choice()

    def choose_field_of(self, image: Image) -> None:
        """Choose the combined entry holding ``image``: an HPA field's four stain layers are one image."""
        for index in range(self.layer_combo.count()):
            entry = self.layer_combo.itemText(index)
            if entry.startswith(_ALL_CHANNEL_LAYERS) and image.name in _entry_layer_names(entry):
                self.layer_combo.setCurrentIndex(index)
                return

    def has_choices(self) -> bool:
        """Whether any image layer is open."""
        return self.layer_combo.count() > 0

    def chosen_layers(self) -> list[Image]:
        """The chosen image's layers: one, or each channel's."""
        names = _entry_layer_names(self.layer_combo.currentText())
        return [self.viewer.layers[name] for name in names if name in self.viewer.layers]

    def channel_axis(self, layer: Image) -> int | None:
        """0 when the user says the (non-RGB, 3D or 4D) layer's first axis holds channels."""
        multi_axis = not layer.rgb and layer.ndim >= 3
        return 0 if multi_axis and self.layout_combo.currentIndex() == 1 else None

    def read_channels(self) -> ImageChannels:
        """The chosen image, read as channels (lazily: no plane is read here).

        Raises:
            ImageError: no image is chosen, or it cannot be annotated.
        """
        layers = self.chosen_layers()
        if not layers:
            raise ImageError(
                "there is no image to annotate: open one (File > Open) or try File > Open Sample > napari-raysam"
            )
        if len(layers) > 1:
            return ImageChannels.from_layers([layer.data for layer in layers], [layer.name for layer in layers])
        layer = layers[0]
        return ImageChannels.from_layer(layer.data, rgb=layer.rgb, channel_axis=self.channel_axis(layer), name=layer.name)

    def sam_channels(self) -> tuple[int, ...]:
        """The 1 or 3 channel indices chosen for SAM's input, in RGB order.

        Raises:
            ImageError: the choice is not 1 or 3 channels.
        """
        green, blue = (combo.currentIndex() - 1 for combo in self.channel_combos[1:])  # 0 is "—"
        return sam_channels_choice(
            self.channel_combos[0].currentIndex(), green if green >= 0 else None, blue if blue >= 0 else None
        )

    def stack_index(self, channels: ImageChannels, layer: Image) -> tuple[int, ...]:
        """The slice of ``channels`` the viewer shows (``()`` for a 2D image)."""
        return stack_index(channels, layer.world_to_data(self.viewer.dims.point), self.channel_axis(layer))

    def shown_plane(self) -> tuple[ImageChannels, Image, tuple[int, ...]]:
        """The chosen image, its first layer (whose placement the annotation follows) and the slice in view.

        Raises:
            ImageError: no image is chosen, or it cannot be annotated.
        """
        channels = self.read_channels()
        layer = self.chosen_layers()[0]
        return channels, layer, self.stack_index(channels, layer)

    def key(self) -> str:
        """The choice (entry and first-axis reading), naming an annotated image within the dock."""
        return f"{self.layer_combo.currentText()}|{self.layout_combo.currentIndex()}"

    def split_channels(self) -> None:
        """Split the chosen channel-last layer into one layer per channel, and choose them as the image."""
        layers = self.chosen_layers()
        if len(layers) != 1:
            return
        names = [layer.name for layer in split_last_axis(self.viewer, layers[0])]
        self.layer_combo.setCurrentText(_ALL_CHANNEL_LAYERS + " + ".join(names))

    def _on_image_choice(self) -> None:
        """A new layer was chosen: guess whether its first axis holds channels, then list its channels."""
        layers = self.chosen_layers()
        single = layers[0] if len(layers) == 1 else None
        multi_axis = single is not None and not single.rgb and single.ndim >= 3
        self.layout_combo.setEnabled(multi_axis)
        self.layout_combo.blockSignals(True)
        self.layout_combo.setCurrentIndex(1 if single is not None and first_axis_is_channels(single.data.shape, single.rgb) else 0)
        self.layout_combo.blockSignals(False)
        channel_last = single is not None and last_axis_is_channels(single.data.shape, single.rgb)
        self.split_button.setVisible(channel_last)
        self._refresh_channels()
        if channel_last:
            self.message.emit(
                f"layer '{single.name}' looks like (H, W, C) = {single.data.shape} with its channels last, which napari "
                f"shows as {single.data.shape[0]} thin slices: press Split channels to annotate it as one image"
            )

    def _refresh_channels(self) -> None:
        """List the chosen image's channels in the SAM channel choosers (none if it is unusable)."""
        try:
            channels = self.read_channels()
        except ImageError as error:
            if self.chosen_layers():
                self.message.emit(str(error))
            self._fill_channel_combos([], ())
        else:
            self._fill_channel_combos(list(channels.names), channels.default_sam_channels())
        self.channels_changed.emit()

    def _fill_channel_combos(self, names: list[str], default: tuple[int, ...]) -> None:
        for position, combo in enumerate(self.channel_combos):
            combo.blockSignals(True)
            combo.clear()
            combo.addItems(names if position == 0 else [_NO_CHANNEL, *names])
            if position < len(default):
                combo.setCurrentIndex(default[position] + (0 if position == 0 else 1))
            combo.setEnabled(len(names) > 1)
            combo.blockSignals(False)
