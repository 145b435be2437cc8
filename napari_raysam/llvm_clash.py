"""Keeps Triton out of a process whose OpenGL driver has loaded LLVM (Linux with Mesa).

Mesa's OpenGL drivers (llvmpipe: Xvfb, VNC and remote desktops, virtual machines; radeonsi:
AMD graphics) load the system's ``libLLVM`` when napari makes its OpenGL context. Triton, which
the CUDA builds of PyTorch ship, carries an LLVM of its own, and loading it into such a process
kills the process with a segmentation fault (PyTorch imports Triton when ``torchvision.ops``
loads ``torch._dynamo``). napari makes its context before it imports a plugin, so opening our
docks or our sample from napari's menus crashed napari itself on those displays; importing
torch before the context exists, as a script or a test does, never showed it.

Nothing in the napari process compiles with Triton, so there it is made unimportable (an
``ImportError``, which PyTorch treats as Triton not being installed). Elsewhere (the command
line, Ray workers, a process without Mesa's LLVM) this does nothing.
"""

from __future__ import annotations

import sys
from pathlib import Path

PROCESS_MAPS = Path("/proc/self/maps")


def keep_triton_out_if_llvm_is_loaded(maps: Path = PROCESS_MAPS) -> bool:
    """Block ``import triton`` when a ``libLLVM`` is mapped into this process and Triton is not loaded yet.

    Args:
        maps: the process's memory map (Linux's ``/proc/self/maps``); where it does not exist
            (macOS, Windows) nothing is done.

    Returns:
        Whether Triton was blocked.
    """
    if "triton" in sys.modules or not maps.exists():
        return False
    if "libLLVM" not in maps.read_text(errors="replace"):
        return False
    sys.modules["triton"] = None  # `import triton` now raises ImportError
    return True
