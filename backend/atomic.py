"""Atomic writes: a file or folder appears complete or not at all.

Every writer of a run directory, a dataset, a model folder, the annotator's autosave and the
client's settings goes through these, so a crash or a concurrent reader never sees half a file.
Files get the usual ``0o644``-style mode of the umask (not ``tempfile``'s ``0o600``), so the
group of a shared storage folder can read them; secrets (a token file) ask for ``PRIVATE_MODE``,
which they have from their first byte on.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

_UMASK = os.umask(0)
os.umask(_UMASK)  # read once, at import: os.umask can only be read by setting it
FILE_MODE = 0o666 & ~_UMASK
"""The mode a plainly created file gets (0o644 under the usual umask 022)."""
PRIVATE_MODE = 0o600
"""Owner-only, whatever the umask: for secrets."""


@contextlib.contextmanager
def staging_file(path: Path, mode: int = FILE_MODE) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` atomically, with ``mode``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    try:
        yield staging
        os.chmod(staging, mode)  # writers such as safetensors create files 0o600
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)


def write_file(
    path: Path, write: Callable[[BinaryIO], object], *, durable: bool = False, mode: int = FILE_MODE
) -> None:
    """Write ``path`` with ``write(binary_file)``, atomically.

    ``durable`` also flushes the data to disk before the rename (``fsync``): for user work
    (autosaved annotations) that must survive a power cut, not for progress files rewritten
    every step. ``mode`` is the file's from its creation on, so a ``PRIVATE_MODE`` secret is never
    readable by others, not even half-written.
    """
    with staging_file(path, mode) as staging:
        # O_EXCL: a file planted at the staging name (with other permissions) fails the write instead
        with os.fdopen(os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode), "wb") as file:
            write(file)
            if durable:
                file.flush()
                os.fsync(file.fileno())


def write_text(path: Path, text: str, *, durable: bool = False, mode: int = FILE_MODE) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically, with ``mode``."""
    data = text.encode()
    write_file(path, lambda file: file.write(data), durable=durable, mode=mode)


@contextlib.contextmanager
def staging_folder(folder: Path) -> Iterator[Path]:
    """Yield an empty folder next to ``folder``; on success it replaces ``folder``.

    POSIX cannot rename over a non-empty folder, so an existing ``folder`` is first renamed aside
    and deleted only once the new one is in place (and put back if that fails).
    """
    folder = Path(folder)
    staging = folder.parent / f".{folder.name}.{uuid.uuid4().hex}.tmp"
    staging.mkdir(parents=True)  # not tempfile.mkdtemp: its 0o700 mode would hide the model from other users
    try:
        yield staging
        for file in staging.rglob("*"):
            if file.is_file():
                os.chmod(file, FILE_MODE)  # writers such as safetensors create files 0o600
        if folder.exists():
            retired = folder.parent / f".{folder.name}.{uuid.uuid4().hex}.old"
            os.rename(folder, retired)
            try:
                os.rename(staging, folder)
            except BaseException:
                os.rename(retired, folder)
                raise
            shutil.rmtree(retired)
        else:
            os.rename(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
