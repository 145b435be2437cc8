"""Image embeddings computed once, kept on disk by encoder fingerprint + image content hash.

Decoder-mode training never changes the image encoder, so an image's embedding is the same
for every run that starts from the same encoder. The cache lives in the run storage
(``<storage>/embedding-cache/``, a folder or an object store), not in the client's ``$NAPARI_RAYSAM_HOME``: the backend
runs on cluster workers, and the storage is the one folder every worker of every run can
reach (contract 2); ``$NAPARI_RAYSAM_HOME`` is the napari computer's own state.

Layout: ``<cache>/<encoder fingerprint[:32]>/<sha256 of the SAM input[:32]>.npz`` holding
``embedding`` ``(256, 64, 64)`` float16 and ``input_size`` ``(2,)`` int; written atomically
(``backend.storage.write_bytes``: on a disk with the umask's mode, group-readable where it allows).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from backend.dataset import content_sha256
from backend.storage import Location, location, write_bytes

CACHE_FOLDER = "embedding-cache"


class EmbeddingCache:
    """Get and put whole-image embeddings of one encoder."""

    def __init__(self, storage: str | Path, encoder_fingerprint: str) -> None:
        self.folder = location(storage) / CACHE_FOLDER / encoder_fingerprint[:32]

    def _path(self, sam_image: np.ndarray) -> Location:
        return self.folder / f"{content_sha256(np.ascontiguousarray(sam_image))[:32]}.npz"

    def get(self, sam_image: np.ndarray) -> tuple[np.ndarray, tuple[int, int]] | None:
        """The cached ``(256, 64, 64)`` float16 embedding of a ``(3, H, W)`` SAM input and its input size."""
        path = self._path(sam_image)
        try:
            with np.load(io.BytesIO(path.read_bytes())) as stored:
                return stored["embedding"], tuple(int(s) for s in stored["input_size"])
        except (OSError, KeyError, ValueError):  # missing, or half-written by a killed run: recompute
            return None

    def put(self, sam_image: np.ndarray, embedding: np.ndarray, input_size: tuple[int, int]) -> None:
        """Store an embedding; a storage that cannot be written only loses the cache, never the run."""
        buffer = io.BytesIO()
        np.savez(buffer, embedding=embedding.astype(np.float16), input_size=np.asarray(input_size))
        try:
            write_bytes(self._path(sam_image), buffer.getvalue())
        except OSError:
            return
