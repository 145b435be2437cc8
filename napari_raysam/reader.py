"""napari reader (npe2): an HPA field of view, from any one of its four files, or a folder of fields."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from napari_raysam.annotator.hpa import (
    CHANNEL_NAMES, COLOURS, field_of_view, fields_in_folder, is_hpa_file, read_field, read_series,
)

LayerData = list[tuple]


def get_reader(path: str | list[str]) -> Callable[[str | list[str]], LayerData] | None:
    """The HPA reader when ``path`` is an HPA stain file or a folder holding some, else None (napari asks others)."""
    if isinstance(path, list):
        path = path[0] if len(path) == 1 else ""
    candidate = Path(path)
    if candidate.is_dir():
        return read_hpa if any(is_hpa_file(child) for child in candidate.iterdir()) else None
    return read_hpa if is_hpa_file(candidate) else None


def read_hpa(path: str | list[str]) -> LayerData:
    """The field (or folder of fields) at ``path`` as four channel layers, coloured as HPA shows them.

    One layer per stain, named ``"<stain> (<field or folder>)"``, blended additively. A folder is
    a lazy stack with one field per slice. ``metadata["hpa_fields"]`` lists the fields' names in
    order; by it the annotator takes the four layers as one image.

    Raises:
        ImageError: a stain file is missing or unreadable, or fields in a folder differ in size.
    """
    path = Path(path[0] if isinstance(path, list) else path)
    if path.is_dir():
        fields = fields_in_folder(path)
        data, title = read_series(fields), path.name
    else:
        fields = [field_of_view(path)]
        data, title = read_field(fields[0]), fields[0].name
    metadata = {"hpa_fields": [field.name for field in fields]}
    return [(data, {
        "name": [f"{stain} ({title})" for stain in CHANNEL_NAMES],
        "channel_axis": 0,
        "colormap": list(COLOURS),
        "blending": "additive",
        "metadata": metadata,
    }, "image")]
