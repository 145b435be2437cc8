"""Storage anywhere: run folders, datasets and models on a local disk or in an object store.

Every place a run reads or writes (the run directory of contract 2, the uploaded dataset, the
embedding cache, the model folder) is a *location*: a ``pathlib.Path`` for a local or
shared-filesystem folder, or a universal-pathlib ``UPath`` over fsspec for an object-store URI
(``s3://`` through s3fs, ``gs://`` through gcsfs). Both have the pathlib API, so the code that
uses a location does not ask which it is; the few operations pathlib has no atomic or
streaming form of for object stores are the functions below.

S3-compatible servers (MinIO, Ceph, moto) are reached through the standard AWS environment:
``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``), ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``, which botocore reads on both sides. Ray
Train's checkpoints go through the same fsspec filesystem (wrapped for pyarrow), so one set of
credentials and one endpoint serve the dataset, the checkpoints and the model.

Object stores have no rename and no append: a file is written with one PUT, which an object
store makes visible whole or not at all (atomic, like ``backend.atomic`` on a disk), and
``append_line`` rewrites the small file it appends to.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Union

from upath import UPath

from backend.atomic import staging_folder, write_file

Location = Union[Path, UPath]
"""A folder or file: ``Path`` on a local or shared filesystem, ``UPath`` in an object store."""

DATASETS_FOLDER = "datasets"
"""``<storage>/datasets/<fingerprint[:32]>.zarr``: datasets uploaded for runs, by content."""
UPLOAD_COMPLETE = ".upload-complete"
"""Written last into an uploaded folder: without it the upload was cut off and is redone."""


class StorageError(OSError):
    """A storage location cannot be read or written; the message says what to check."""


def unreachable_storage(where: str, error: Exception) -> str:
    """The plain message for a storage location that cannot be read or written."""
    return (
        f"cannot use the storage {where}: {error}. Check the path or URI and, for an S3-compatible server, "
        "AWS_ENDPOINT_URL and the credentials (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)"
    )


def plain_reason(error: BaseException) -> str:
    """What went wrong, for a person: an OSError's own words ("No space left on device") without its
    errno and path, any other error's message."""
    return str(getattr(error, "strerror", None) or error)


def refused_write(where: str, what: str, error: Exception) -> str:
    """The plain message for a storage that refused to store part of a run (full, over quota, read-only)."""
    return (
        f"the storage {where} refused to store {what} ({plain_reason(error)}). Free space there or give write access "
        "back; the dataset and the epochs stored before are intact"
    )


@contextlib.contextmanager
def storing(where: str, what: str) -> Iterator[None]:
    """Writes in the block that fail raise a :class:`StorageError` saying :func:`refused_write`."""
    try:
        yield
    except StorageError:
        raise
    except Exception as error:  # OSError on a disk; botocore's own errors from an object store
        raise StorageError(refused_write(where, what, error)) from error


def is_uri(text: str | os.PathLike[str]) -> bool:
    """True for an object-store URI (``s3://bucket/key``), False for a local path or ``file://``."""
    return "://" in str(text) and not str(text).startswith("file://")


def location(where: str | os.PathLike[str] | Location) -> Location:
    """The location ``where`` names: a resolved ``Path``, or a ``UPath`` for a URI.

    Directory listings are not cached: a run's files change while the client reads them.
    """
    if isinstance(where, UPath) and not isinstance(where, Path):
        return where
    text = str(where)
    if is_uri(text):
        return UPath(text, use_listings_cache=False)
    return Path(text.removeprefix("file://")).expanduser().resolve()


def is_remote(place: Location) -> bool:
    return not isinstance(place, Path)


def cache_dir() -> Path:
    """This machine's cache of downloaded datasets and models: ``$NAPARI_RAYSAM_CACHE`` or ``~/.cache/napari-raysam``."""
    return Path(os.environ.get("NAPARI_RAYSAM_CACHE") or Path.home() / ".cache" / "napari-raysam")


# -- files ------------------------------------------------------------------------------------------
def make_folder(place: Location) -> None:
    """Create the folder ``place`` on a disk. An object store has no folders, and its bucket is not ours
    to create: a missing bucket is an error on the first write, not a bucket made in the user's account."""
    if not is_remote(place):
        place.mkdir(parents=True, exist_ok=True)


def write_bytes(place: Location, data: bytes) -> None:
    """Write ``place`` whole and atomically: a rename on a disk, one PUT in an object store."""
    if is_remote(place):
        place.write_bytes(data)
    else:
        write_file(place, lambda file: file.write(data))


def write_text(place: Location, text: str) -> None:
    """Write UTF-8 ``text`` to ``place``, atomically."""
    write_bytes(place, text.encode())


def append_line(place: Location, line: str) -> None:
    """Append one line (``line`` without its newline): appended on a disk, the file rewritten in an object store."""
    if is_remote(place):
        try:
            before = place.read_bytes()
        except FileNotFoundError:
            before = b""
        write_bytes(place, before + line.encode() + b"\n")
    else:
        with open(place, "a") as file:
            file.write(line + "\n")


def file_sha256(place: Location) -> str:
    """sha256 hex digest of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with place.open("rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# -- folders ----------------------------------------------------------------------------------------
def upload_folder(source: Path, destination: Location, *, last: str = UPLOAD_COMPLETE) -> None:
    """Copy the local folder ``source`` to ``destination``, the file named ``last`` after all others.

    ``last`` marks the copy complete: a model folder's ``meta.json``, or for a dataset an empty
    ``UPLOAD_COMPLETE`` written when the folder has no such file. A reader takes the folder only
    once it is there, so a cut-off upload is never used.
    """
    make_folder(destination)
    files = sorted((p for p in Path(source).rglob("*") if p.is_file()), key=lambda p: (p.name == last, str(p)))
    for file in files:
        target = destination / file.relative_to(source).as_posix()
        if is_remote(destination):
            destination.fs.put_file(str(file), target.path)  # streamed: model weights are up to GBs
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(file, target)
    if not any(file.name == last for file in files):
        write_text(destination / last, "")


def download_folder(source: Location, destination: Path, check: Callable[[Path], None] | None = None) -> Path:
    """Copy the folder ``source`` to the local ``destination`` (replaced atomically); returns ``destination``.

    ``check(copy)`` runs on the complete copy before it replaces ``destination``: an exception from it
    (weights that do not match their sha256) leaves ``destination`` as it was.
    """
    with staging_folder(destination) as staging:
        if is_remote(source):
            root = source.path.rstrip("/")
            for remote in source.fs.find(root):
                target = staging / remote[len(root) + 1:]
                target.parent.mkdir(parents=True, exist_ok=True)
                source.fs.get_file(remote, str(target))
        else:
            shutil.copytree(source, staging, dirs_exist_ok=True)
        if check is not None:
            check(staging)
    return destination


@contextlib.contextmanager
def _cache_lock(name: str) -> Iterator[None]:
    """One process at a time fills a cache entry: the workers of one node start together."""
    lock = cache_dir() / f".{name}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "w") as file:
        fcntl.flock(file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(file, fcntl.LOCK_UN)


def cached_copy(source: Location, kind: str, key: str) -> Path:
    """A local copy of the folder ``source``, downloaded once into ``cache_dir()/kind/key``.

    ``key`` names the content (a fingerprint or a sha256), so a cached copy is never stale.
    """
    destination = cache_dir() / kind / key
    with _cache_lock(f"{kind}-{key}"):
        if not destination.is_dir():
            download_folder(source, destination)
    return destination


# -- datasets -----------------------------------------------------------------------------------------
def upload_dataset(dataset: Path, fingerprint: str, storage: str) -> str:
    """Upload a local dataset into the storage once, by content; returns its URI there.

    ``<storage>/datasets/<fingerprint[:32]>.zarr``: the same annotations are uploaded once however
    many runs train on them, and a changed dataset gets a new name, so a run's data never changes
    under it.
    """
    destination = location(storage) / DATASETS_FOLDER / f"{fingerprint[:32]}.zarr"
    try:
        if not (destination / UPLOAD_COMPLETE).exists():
            upload_folder(Path(dataset), destination)
    except Exception as error:  # botocore's connection and credential errors are not OSErrors
        raise StorageError(unreachable_storage(str(destination), error)) from error
    return str(destination)


def local_dataset(data: str) -> Path:
    """The dataset ``data`` on this machine's disk: a local path as it is, a URI downloaded once into the cache."""
    if not is_uri(data):
        return Path(data)
    source = location(data)
    if not (source / UPLOAD_COMPLETE).exists():
        raise StorageError(
            f"{data} is not a complete dataset upload (no {UPLOAD_COMPLETE}): submit the run again "
            "from napari-raysam, which uploads the dataset to the storage first"
        )
    return cached_copy(source, DATASETS_FOLDER, source.name)


def ray_storage(storage: str) -> tuple[str, object | None]:
    """Ray Train's ``(storage_path, storage_filesystem)`` for ``storage``: the same fsspec filesystem we use."""
    place = location(storage)
    if not is_remote(place):
        return str(place), None
    import pyarrow.fs

    return place.path, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(place.fs))
