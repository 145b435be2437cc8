"""Local Ray clusters in the tests: the state folder they are started in, what the tests look at in their processes."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import psutil


@contextlib.contextmanager
def state_folder(home: Path) -> Iterator[None]:
    """``$NAPARI_RAYSAM_HOME`` is ``home`` meanwhile: an embedded cluster started (or a node joined) in it
    keeps its token and record there, whatever the test's own state folder is."""
    previous = os.environ.get("NAPARI_RAYSAM_HOME")
    os.environ["NAPARI_RAYSAM_HOME"] = str(home)
    try:
        yield
    finally:
        os.environ.pop("NAPARI_RAYSAM_HOME") if previous is None else os.environ.update(NAPARI_RAYSAM_HOME=previous)


def or_empty(read):
    """``read()``, or nothing for a process that ended meanwhile (a worker the job no longer needs)."""
    try:
        return read()
    except psutil.NoSuchProcess:
        return []


def listening_sockets(processes: list[psutil.Process]) -> list[tuple[str, int, str]]:
    """(ip, pid, process name) of each socket of ``processes`` that takes connections or datagrams from others."""
    return [
        (connection.laddr.ip, process.pid, process.name())
        for process in processes for connection in or_empty(lambda: process.net_connections("inet"))
        if connection.status == psutil.CONN_LISTEN or (connection.status == psutil.CONN_NONE and not connection.raddr)
    ]
