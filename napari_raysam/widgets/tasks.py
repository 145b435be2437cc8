"""Running a dock's slow work in a worker thread, and saying in plain words how it failed.

Every dock runs its slow work (model loading, embeddings, export, following a run) through
:func:`start_task`, and turns a failure into its status line with :func:`failure_message`: the
user's expected errors are shown as they are, anything else is a bug, logged with its traceback.
When Python exits (napari closed) it first stops and waits for the workers that still run.
"""

from __future__ import annotations

import atexit
import logging
import threading
from collections.abc import Callable
from typing import Any

from napari.qt.threading import create_worker
from qtpy.QtCore import QThreadPool

log = logging.getLogger("napari_raysam.widgets")

EXIT_WAIT_MS = 60_000
"""How long Python, exiting, waits for the docks' workers that still run."""

_running: set = set()  # the workers started here that have not reported their end
_pools: set[QThreadPool] = set()  # the thread pools they ran in
_closing = threading.Event()


class Closing(Exception):
    """Python is exiting (napari was closed): the task stops at its next progress report."""


def stop_if_closing() -> None:
    """Raise :class:`Closing` when Python is exiting; long tasks call it with each progress report."""
    if _closing.is_set():
        raise Closing("napari was closed")


@atexit.register
def _wait_for_workers() -> None:
    # Python tearing down while one of our workers still runs Python code (an embedding, a series'
    # read-ahead) crashed the process after napari closed. Ask them to stop (generators at their
    # next step, progress reporters at their next report) and wait for them first.
    if not _running:
        return
    _closing.set()
    for worker in list(_running):
        worker.quit()
    for pool in _pools:
        pool.waitForDone(EXIT_WAIT_MS)


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
    _running.add(worker)
    worker.finished.connect(lambda: _running.discard(worker))
    if pool is None:
        _pools.add(QThreadPool.globalInstance())
        worker.start()
    else:
        _pools.add(pool)
        pool.start(worker)
    return worker


def failure_message(error: Exception, expected: tuple[type[Exception], ...], doing: str) -> str:
    """The status line for ``error``: its own words when it is one of the ``expected`` user errors,
    else a request to report it (the traceback goes to the log, naming what the dock was ``doing``)."""
    if isinstance(error, expected):
        return str(error)
    log.error("napari-raysam %s failed", doing, exc_info=error)
    return f"unexpected error ({type(error).__name__}: {error}); details are in the terminal. Please report it."
