"""Running a dock's slow work in a worker thread, and saying in plain words how it failed.

Every dock runs its slow work (model loading, embeddings, export, following a run) through
:func:`start_task`, and turns a failure into its status line with :func:`failure_message`: the
user's expected errors are shown as they are, anything else is a bug, logged with its traceback.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from napari.qt.threading import create_worker
from qtpy.QtCore import QThreadPool

log = logging.getLogger("napari_raysam.widgets")


def start_task(
    task: Callable[..., Any],
    *args: Any,
    failed: Callable[[Exception], None],
    done: Callable[[Any], None] | None = None,
    yielded: Callable[[Any], None] | None = None,
    finished: Callable[[], None] | None = None,
    pool: QThreadPool | None = None,
):
    """Run ``task(*args)`` in a worker thread and return the worker (hold it until ``finished``).

    On the GUI thread: ``yielded(value)`` for each value a generator ``task`` yields, then
    ``done(result)`` or ``failed(error)``, then ``finished()``. ``pool``: the thread pool to run
    in (default: napari's global one).
    """
    worker = create_worker(task, *args, _start_thread=False, _ignore_errors=True)  # failed() handles them
    for signal, slot in ((worker.returned, done), (worker.errored, failed), (worker.finished, finished)):
        if slot is not None:
            signal.connect(slot)
    if yielded is not None:
        worker.yielded.connect(yielded)
    if pool is None:
        worker.start()
    else:
        pool.start(worker)
    return worker


def failure_message(error: Exception, expected: tuple[type[Exception], ...], doing: str) -> str:
    """The status line for ``error``: its own words when it is one of the ``expected`` user errors,
    else a request to report it (the traceback goes to the log, naming what the dock was ``doing``)."""
    if isinstance(error, expected):
        return str(error)
    log.error("napari-raysam %s failed", doing, exc_info=error)
    return f"unexpected error ({type(error).__name__}: {error}); details are in the terminal. Please report it."
