"""What the tests look at in a local Ray cluster's processes."""

from __future__ import annotations

import psutil


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
