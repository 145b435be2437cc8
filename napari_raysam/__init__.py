"""Client side of napari-raysam: runs in the napari process or the command line."""

from napari_raysam.llvm_clash import keep_triton_out_if_llvm_is_loaded

__version__ = "0.1.0"

# before any of our modules imports torch: napari imports this package when its menus open a dock
keep_triton_out_if_llvm_is_loaded()
