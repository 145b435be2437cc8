"""The errors that end a run in their own words: the one line the run client shows as its reason."""

from __future__ import annotations


def said_errors() -> tuple[type[Exception], ...]:
    """The errors whose message tells the user what to do: a storage that refused a write, a model
    or a dataset that cannot be read, a setting out of range. Imported when asked, that is when one
    ends a run: the dataset's module loads zarr, 0.4 s of every job driver's start."""
    from backend.config import ConfigError
    from backend.dataset.samples import DatasetError
    from backend.models.errors import ModelError
    from backend.storage import StorageError

    return (StorageError, ModelError, DatasetError, ConfigError)
