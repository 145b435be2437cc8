"""Client side of napari-raysam: runs in the napari process or the command line."""

__version__ = "0.1.0"
