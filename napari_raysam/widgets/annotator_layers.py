"""The annotator's five napari layers: created once when the dock opens, reused for every image, read as prompts."""

from __future__ import annotations

from collections.abc import Callable

import napari
import numpy as np
from napari.layers import Image, Labels, Layer

from napari_raysam.annotator.prompts import NEGATIVE, POSITIVE, Prompts, prompts_from_layers

POINTS_LAYER = "SAM point prompts"
BOXES_LAYER = "SAM box prompts"
CURRENT_LAYER = "SAM current object"
COMMITTED_LAYER = "SAM committed objects"
AUTOMATIC_LAYER = "SAM automatic segmentation"
LAYER_NAMES = (COMMITTED_LAYER, AUTOMATIC_LAYER, CURRENT_LAYER, BOXES_LAYER, POINTS_LAYER)
"""The five layers, bottom to top."""

_LABELS = {COMMITTED_LAYER: (np.uint32, 0.7), AUTOMATIC_LAYER: (np.uint32, 0.5), CURRENT_LAYER: (np.uint8, 0.6)}
"""The labels layers' pixel type and opacity (0.7: napari's default)."""
_PROMPT_COLORS = ["#00ff00", "#ff0000"]  # positive green, negative red, as micro-sam
_EMPTY_SHAPE = (1, 1)
CLEARED_IN_PLACE_PIXELS = 2048 * 2048
"""Labels up to this size are cleared by zeroing them where they are (:meth:`AnnotatorLayers.clear`)."""


def _empty(dtype) -> np.ndarray:
    """What an empty labels layer holds: one unlabelled pixel (napari needs some data)."""
    return np.zeros(_EMPTY_SHAPE, dtype)


def warm_up_labels() -> None:
    """Make napari ready to colour our labels layers, in any thread: the first labels layer of a pixel
    type loads napari's colour lookup from numba's cache (0.3-0.4 s), which on napari's thread, as
    the dock is built, froze it meanwhile. The layers made here are never shown."""
    for dtype in {dtype for dtype, _ in _LABELS.values()}:
        Labels(_empty(dtype))


class AnnotatorLayers:
    """Point and box prompts, the proposed object, the committed objects and the automatic result.

    The five layers are created once, when the dock opens (:meth:`create_missing`), and reused for
    every image: adding any layer to napari blocks its event loop for 0.2-0.6 s once a large image
    is open (napari's own cost: layer controls, shaders, a redraw; measured in
    ``docs/BENCHMARKS.md``), while replacing a layer's data costs less than 0.12 s even at
    10,000 x 10,000. A labels layer with nothing to show holds a single empty pixel at the image's
    origin (:func:`_empty`), so that opening an image costs the dock no full-size arrays.

    ``on_taken(name, layer)`` is called once for each layer this starts using (for key bindings,
    events): one it creates, or one it finds in the viewer (made before the dock was built,
    :meth:`creation_steps`, or by an earlier dock).
    """

    def __init__(self, viewer: napari.viewer.Viewer, on_taken: Callable[[str, Layer], None]) -> None:
        self.viewer = viewer
        self._on_taken = on_taken
        self._taken: dict[str, Layer] = {}
        self._scale, self._translate = np.ones(2), np.zeros(2)  # the image's last two axes (:meth:`place`)
        self._point_size = 8.0

    def get(self, name: str) -> Layer | None:
        """The layer called ``name``, or None (the user may have deleted it)."""
        return self.viewer.layers[name] if name in self.viewer.layers else None

    def creation_steps(self) -> list[Callable[[], None]]:
        """One call per missing layer, each creating it: for napari's thread to run one per turn of its
        event loop, so that it draws and answers between them (0.1-0.4 s each; five at once held it ~1 s)."""
        return [lambda name=name: self._create(name) for name in LAYER_NAMES if self.get(name) is None]

    def create_missing(self) -> None:
        """Create those of the five layers that do not exist (all at first; one the user deleted),
        empty and placed on the last image :meth:`place` was given, and take those that do."""
        for name in LAYER_NAMES:
            layer = self.get(name)
            if layer is None:
                layer = self._create(name)
            if self._taken.get(name) is not layer:
                self._taken[name] = layer
                self._on_taken(name, layer)

    def _create(self, name: str) -> Layer:
        placed = {"scale": self._scale, "translate": self._translate}
        if name == POINTS_LAYER:
            layer = self.viewer.add_points(
                name=POINTS_LAYER, ndim=2, face_color="transparent", border_width=0.3,
                features={"prompt": np.array([], dtype=object)}, property_choices={"prompt": [POSITIVE, NEGATIVE]},
                border_color="prompt", border_color_cycle=_PROMPT_COLORS, **placed,
            )
            layer.current_size = self._point_size
            return layer
        if name == BOXES_LAYER:
            return self.viewer.add_shapes(
                name=BOXES_LAYER, ndim=2, face_color="transparent", edge_color="#00ffff", edge_width=2, **placed,
            )
        dtype, opacity = _LABELS[name]
        layer = self.viewer.add_labels(_empty(dtype), name=name, opacity=opacity, **placed)
        if name == COMMITTED_LAYER:
            layer.editable = False  # until an image is annotated (:meth:`ensure`)
        return layer

    def place(self, image: Image) -> None:
        """Align the five layers with ``image``'s last two axes (its scale and translation) and size
        the points for it; their data stay as they are. Cheap: no array is allocated."""
        scale, translate = tuple(image.scale[-2:]), tuple(image.translate[-2:])
        self._scale, self._translate = np.asarray(scale, float), np.asarray(translate, float)
        self._point_size = max(8, max(image.data.shape[-2:]) // 60)
        for name in LAYER_NAMES:
            layer = self.get(name)
            if layer is not None and (tuple(layer.scale) != scale or tuple(layer.translate) != translate):
                layer.scale, layer.translate = scale, translate
        points = self.get(POINTS_LAYER)
        if points is not None:
            points.current_size = self._point_size

    def ensure(self, image: Image, committed: np.ndarray, replace: bool) -> None:
        """Show ``committed`` ((H, W) uint32, the plane's objects) over ``image``, with no proposed
        object and no automatic result, and make it paintable. ``replace=False`` says that neither
        the committed layer nor ``committed`` holds an object (the caller knows without scanning
        them): a layer of the same shape then stays as it is, since a large image's labels take a
        tenth of a second to show."""
        self.create_missing()
        self.place(image)
        layer = self.get(COMMITTED_LAYER)
        if replace or layer.data.shape != committed.shape:
            layer.data = committed
        layer.editable = True
        self.clear(CURRENT_LAYER)
        self.clear(AUTOMATIC_LAYER)

    def show(self, name: str, labels: np.ndarray, origin: tuple[int, int] = (0, 0)) -> None:
        """Show ``labels`` ((h, w) integers) in the labels layer ``name``, their pixel (0, 0) on the
        image's pixel ``origin`` (row, column): the proposed objects cropped to their bounding box,
        or the automatic result (the whole image). napari copies and colours every pixel of a labels
        layer, so a crop is what keeps a prompt on a 10,000 x 10,000 image from stalling the viewer."""
        self.create_missing()
        layer = self.get(name)
        layer.data = labels
        layer.translate = self._translate + np.asarray(origin) * self._scale

    def redraw(self, name: str, box: tuple[slice, slice]) -> None:
        """Show what changed in place inside ``box`` (rows, columns) of the labels layer ``name``.

        A labels layer's ``refresh`` recolours every pixel: ~0.1 s on napari's thread for a 10,000 x
        10,000 uint32 layer, at every commit. This recolours the box only, as napari's brush does
        (``Labels.data_setitem``); those are napari's private methods, so where they differ the
        layer is refreshed whole.
        """
        layer = self.get(name)
        try:
            if layer.contour == 0:
                layer._slice.image.view[box] = layer.colormap._data_to_texture(layer.data[box])
            layer._accumulate_updated_slice(box)
            layer._partial_labels_refresh()
        except AttributeError:
            layer.refresh()

    def origin(self, name: str) -> tuple[int, int]:
        """The image pixel (row, column) under pixel (0, 0) of the labels layer ``name`` (:meth:`show`)."""
        offset = (np.asarray(self.get(name).translate[-2:]) - self._translate) / self._scale
        return int(round(offset[0])), int(round(offset[1]))

    def clear(self, name: str, same_image: bool = False) -> None:
        """Empty the labels layer ``name`` (the current object or the automatic result): one empty
        pixel at the image's origin.

        ``same_image=True`` (after a Commit, or prompts cleared, on the image they were drawn on):
        a crop up to :data:`CLEARED_IN_PLACE_PIXELS` is zeroed where it is and redrawn instead.
        Giving the layer new data and a new translation makes napari recompute the viewer's
        dimensions twice, ~30 ms of the 80-100 ms that a Commit held napari's thread on a
        10,000 x 10,000 image; a crop lies inside its image, so it widens nothing. Not when the
        image changes: a crop kept from a larger image would widen a smaller one's view.
        """
        layer = self.get(name)
        if layer is None:
            return
        if same_image and layer.data.size <= CLEARED_IN_PLACE_PIXELS:
            if layer.data.any():
                layer.data[...] = 0
                self.redraw(name, tuple(slice(0, side) for side in layer.data.shape))
            return
        if layer.data.shape != _EMPTY_SHAPE or layer.data.any():
            layer.data = _empty(layer.data.dtype)
        if self.origin(name) != (0, 0):
            layer.translate = self._translate

    def keep_on_top(self) -> None:
        """Move this annotator's layers above all others, keeping their order: an image opened after
        them (e.g. the other stains of an HPA field) would otherwise cover the prompts and masks."""
        layers = self.viewer.layers
        ours = set(LAYER_NAMES)
        indices = [index for index, layer in enumerate(layers) if layer.name in ours]
        if indices and indices != list(range(len(layers) - len(indices), len(layers))):
            layers.move_multiple(indices, len(layers))

    def set_prompt_kind(self, kind: str) -> None:
        """Make the next points ``POSITIVE`` or ``NEGATIVE``."""
        points = self.get(POINTS_LAYER)
        if points is not None:
            points.feature_defaults["prompt"] = kind

    def prompts(self) -> Prompts:
        """The points and the boxes drawn, as SAM's prompts."""
        points, boxes = self.get(POINTS_LAYER), self.get(BOXES_LAYER)
        has_points = points is not None and len(points.data)
        return prompts_from_layers(
            points.data if has_points else np.zeros((0, 2)),
            points.features["prompt"].to_numpy() if has_points else [],
            boxes.data if boxes is not None else [],
        )

    def clear_prompts(self) -> None:
        """Drop all points, boxes and the shown object (on the image they were drawn on)."""
        for name in (POINTS_LAYER, BOXES_LAYER):
            layer = self.get(name)
            if layer is not None and len(layer.data):
                # napari keeps the selection of removed points; setting their size then fails
                layer.selected_data = set()
                layer.data = []
        self.clear(CURRENT_LAYER, same_image=True)


def split_last_axis(viewer: napari.Viewer, layer: Image) -> list[Image]:
    """Replace the channel-last ``(H, W, C)`` ``layer`` by one layer per channel (lazy data stays
    lazy), named ``"<name> [k]"`` and placed like it, as napari's own *Split Stack* does; left in
    place, the 3D layer would keep a slider over its rows.

    Returns:
        The new layers, in channel order.
    """
    channels = np.moveaxis(layer.data, -1, 0)
    added = viewer.add_image(
        channels, channel_axis=0, name=[f"{layer.name} [{k}]" for k in range(channels.shape[0])],
        scale=layer.scale[:2], translate=layer.translate[:2],
    )
    viewer.layers.remove(layer)
    viewer.reset_view()
    return list(added)
