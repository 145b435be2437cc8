"""Human Protein Atlas fields of view: four grayscale stain files per field, read as one image.

HPA stores a field of view as ``<field>_red.<ext>`` (microtubules), ``_green`` (the protein of
interest), ``_blue`` (nucleus) and ``_yellow`` (ER), typically 2048 x 2048. Here a field is
one ``(4, H, W)`` image in that order, which :meth:`ImageChannels.default_sam_channels` maps to
SAM's RGB as microtubules, ER, nucleus. A folder of fields of the same size reads as a lazy
``(4, N, H, W)`` stack, one field per slice, so the annotator goes through it slice by slice.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from backend.dataset import DatasetError
from napari_raysam.annotator.image_source import ImageError
from napari_raysam.export import read_image_file

STAINS = (("red", "microtubules"), ("green", "protein"), ("blue", "nucleus"), ("yellow", "ER"))
"""HPA's file colour and what it stains, in channel order."""
COLOURS = tuple(colour for colour, _ in STAINS)
CHANNEL_NAMES = tuple(stain for _, stain in STAINS)

_FILE = re.compile(r"^(?P<field>.+)_(?P<colour>red|green|blue|yellow)\.(png|tif|tiff|jpg|jpeg)$", re.IGNORECASE)


@dataclass(frozen=True)
class FieldOfView:
    """One HPA field of view: its name (the files' common prefix) and its four files in :data:`STAINS` order."""

    name: str
    files: tuple[Path, Path, Path, Path]


def _stain_files(folder: Path) -> dict[str, dict[str, Path]]:
    """field name -> colour -> file, for every HPA-named file in ``folder``."""
    fields: dict[str, dict[str, Path]] = {}
    for path in sorted(folder.iterdir()):
        match = _FILE.match(path.name)
        if match and path.is_file():
            fields.setdefault(match["field"], {})[match["colour"].lower()] = path
    return fields


def _complete(name: str, files: dict[str, Path], folder: Path) -> FieldOfView:
    missing = [f"{colour} ({stain})" for colour, stain in STAINS if colour not in files]
    if missing:
        raise ImageError(
            f"HPA field '{name}' in {folder} has no {' and no '.join(missing)} file: an HPA field of view "
            f"is four files, {', '.join(f'{name}_{colour}' for colour in COLOURS)} (.png, .tif or .jpg); "
            f"add the missing one, or open the files present as separate layers"
        )
    return FieldOfView(name, tuple(files[colour] for colour in COLOURS))


def is_hpa_file(path: str | Path) -> bool:
    """True for a file named like one stain of an HPA field (``<field>_<red|green|blue|yellow>.<png|tif|jpg>``)."""
    return _FILE.match(Path(path).name) is not None


def field_of_view(path: str | Path) -> FieldOfView:
    """The field of view that ``path``, any one of its four files, belongs to.

    Raises:
        ImageError: ``path`` is not named like an HPA stain file, or a stain file is missing.
    """
    path = Path(path)
    match = _FILE.match(path.name)
    if match is None:
        raise ImageError(f"{path.name} is not named like an HPA stain file (<field>_red.png, _green, _blue, _yellow)")
    files = _stain_files(path.parent).get(match["field"], {})
    return _complete(match["field"], files, path.parent)


def fields_in_folder(folder: str | Path) -> list[FieldOfView]:
    """Every field of view in ``folder``, sorted by name (empty if it holds no HPA-named file).

    Raises:
        ImageError: a field in it lacks one of its four files.
    """
    folder = Path(folder)
    return [_complete(name, files, folder) for name, files in _stain_files(folder).items()]


def _read_stain(path: Path) -> np.ndarray:
    """One stain file as ``(H, W)``; a colour-rendered one (HPA's jpgs) by its brightest component."""
    try:
        array = read_image_file(path)
    except DatasetError as error:
        raise ImageError(str(error)) from error
    return array[0] if len(array) == 1 else array[:3].max(axis=0)


def read_field(field: FieldOfView) -> np.ndarray:
    """The field's ``(4, H, W)`` intensities in :data:`STAINS` order, in the files' dtype.

    Raises:
        ImageError: a file cannot be read, or the four differ in size or pixel type.
    """
    planes = [_read_stain(path) for path in field.files]
    for path, plane in zip(field.files[1:], planes[1:]):
        if plane.shape != planes[0].shape or plane.dtype != planes[0].dtype:
            raise ImageError(
                f"{path.name} is {plane.shape} {plane.dtype} but {field.files[0].name} is {planes[0].shape} "
                f"{planes[0].dtype}: the four files of a field of view must be the same size and type"
            )
    return np.stack(planes)


def read_series(fields: list[FieldOfView]):
    """A lazy ``(4, N, H, W)`` dask array of ``fields`` (one per slice), each read when first shown.

    The first field is read to learn the size; the others must match it.

    Raises:
        ImageError: no fields, or a field of another size (named, with how to open it).
    """
    import dask
    import dask.array as da

    if not fields:
        raise ImageError("the folder holds no HPA field of view (files named <field>_red.png, _green, _blue, _yellow)")
    first = read_field(fields[0])

    def checked(field: FieldOfView) -> np.ndarray:
        planes = read_field(field)
        if planes.shape != first.shape or planes.dtype != first.dtype:
            raise ImageError(
                f"field '{field.name}' is {planes.shape[1:]} {planes.dtype} but '{fields[0].name}' is "
                f"{first.shape[1:]} {first.dtype}: a folder opens as one series of equally sized fields; "
                f"open this field by one of its files instead"
            )
        return planes

    slices = [da.from_array(first, chunks=first.shape)] + [
        da.from_delayed(dask.delayed(checked)(field), shape=first.shape, dtype=first.dtype) for field in fields[1:]
    ]
    return da.stack(slices, axis=1)
