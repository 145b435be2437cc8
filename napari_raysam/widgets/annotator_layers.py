"""The annotator's five napari layers: created once for an image, then reused, and read as prompts."""

from __future__ import annotations

from collections.abc import Callable

import napari
import numpy as np
from napari.layers import Image, Layer

from napari_raysam.annotator.prompts import NEGATIVE, POSITIVE, Prompts, prompts_from_layers

POINTS_LAYER = "SAM point prompts"
BOXES_LAYER = "SAM box prompts"
CURRENT_LAYER = "SAM current object"
COMMITTED_LAYER = "SAM committed objects"
AUTOMATIC_LAYER = "SAM automatic segmentation"

_PROMPT_COLORS = ["#00ff00", "#ff0000"]  # positive green, negative red, as micro-sam


class AnnotatorLayers:
    """Point and box prompts, the proposed object, the committed objects and the automatic result.

    ``on_created(name, layer)`` is called for each layer this creates (for key bindings, events).
    """

    def __init__(self, viewer: napari.viewer.Viewer, on_created: Callable[[str, Layer], None]) -> None:
        self.viewer = viewer
        self._on_created = on_created

    def get(self, name: str) -> Layer | None:
        """The layer called ``name``, or None (the user may have deleted it)."""
        return self.viewer.layers[name] if name in self.viewer.layers else None

    def ensure(self, image: Image, committed: np.ndarray, *, clear_automatic: bool) -> None:
        """Show ``committed`` ((H, W) uint32) and empty prompt and result layers, aligned with the
        image's last two axes.

        Each layer is created once (again only if the user deleted it) and then reused: creating a
        napari layer blocks the event loop for 70-300 ms (bench/annotator.py); replacing data costs
        less, so only what changed is replaced. ``clear_automatic`` empties an automatic result.
        """
        placement = {"scale": image.scale[-2:], "translate": image.translate[-2:]}
        height, width = committed.shape
        point_size = max(8, max(height, width) // 60)
        create = {
            COMMITTED_LAYER: lambda: self.viewer.add_labels(committed, name=COMMITTED_LAYER, **placement),
            AUTOMATIC_LAYER: lambda: self.viewer.add_labels(
                np.zeros((height, width), np.uint32), name=AUTOMATIC_LAYER, opacity=0.5, **placement
            ),
            CURRENT_LAYER: lambda: self.viewer.add_labels(
                np.zeros((height, width), np.uint8), name=CURRENT_LAYER, opacity=0.6, **placement
            ),
            BOXES_LAYER: lambda: self.viewer.add_shapes(
                name=BOXES_LAYER, ndim=2, face_color="transparent", edge_color="#00ffff", edge_width=2, **placement,
            ),
            POINTS_LAYER: lambda: self.viewer.add_points(
                name=POINTS_LAYER, ndim=2, size=point_size, face_color="transparent", border_width=0.3,
                features={"prompt": np.array([], dtype=object)}, property_choices={"prompt": [POSITIVE, NEGATIVE]},
                border_color="prompt", border_color_cycle=_PROMPT_COLORS, **placement,
            ),
        }
        for name, make in create.items():
            layer = self.get(name)
            if layer is None:
                self._on_created(name, make())
                continue
            if tuple(layer.scale) != tuple(placement["scale"]) or tuple(layer.translate) != tuple(placement["translate"]):
                layer.scale, layer.translate = placement["scale"], placement["translate"]
            if name == COMMITTED_LAYER and (layer.data.shape != committed.shape or layer.data.any() or committed.any()):
                layer.data = committed
            elif name == CURRENT_LAYER and layer.data.shape != (height, width):
                layer.data = np.zeros((height, width), np.uint8)
            elif name == AUTOMATIC_LAYER and (clear_automatic or layer.data.shape != (height, width)):
                layer.data = np.zeros((height, width), np.uint32)
            elif name == POINTS_LAYER:
                layer.current_size = point_size

    def keep_on_top(self) -> None:
        """Move this annotator's layers above all others, keeping their order: an image opened after
        them (e.g. the other stains of an HPA field) would otherwise cover the prompts and masks."""
        layers = self.viewer.layers
        ours = {COMMITTED_LAYER, AUTOMATIC_LAYER, CURRENT_LAYER, BOXES_LAYER, POINTS_LAYER}
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
        """Drop all points, boxes and the shown object."""
        for name in (POINTS_LAYER, BOXES_LAYER):
            layer = self.get(name)
            if layer is not None and len(layer.data):
                # napari keeps the selection of removed points; setting their size then fails
                layer.selected_data = set()
                layer.data = []
        current = self.get(CURRENT_LAYER)
        if current is not None and current.data.any():
            current.data = np.zeros_like(current.data)


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
