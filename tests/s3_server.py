"""A real S3-compatible server on 127.0.0.1 for the tests: moto's server mode, in a process of its own.

It is what s3fs itself tests against. Started and stopped by process id; the standard AWS variables
point every client at it (this process, and through the run client's job environment, Ray's jobs).
While :func:`refusing_writes` is on, the server answers every write as a full MinIO does (``507
XMinioStorageFull``) and still serves reads and deletes.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import requests

_REFUSE_WRITES = Path(tempfile.gettempdir()) / f"s3-server-{os.getpid()}-refuses-writes"
"""While this file exists the server refuses writes (one flag per test process)."""

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def s3_server() -> Iterator[str]:
    """Run moto's S3 server; yields its endpoint URL, with the AWS environment pointing at it meanwhile."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, __file__, str(port), str(_REFUSE_WRITES)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    before = {name: os.environ.get(name) for name in (*CREDENTIALS, "AWS_ENDPOINT_URL")}
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                requests.get(f"{endpoint}/moto-api/", timeout=1)
                break
            except requests.ConnectionError:
                assert process.poll() is None and time.monotonic() < deadline, "moto's S3 server did not start"
                time.sleep(0.2)
        os.environ.update(CREDENTIALS, AWS_ENDPOINT_URL=endpoint)
        yield endpoint
    finally:
        for name, value in before.items():
            os.environ.pop(name, None) if value is None else os.environ.update({name: value})
        process.terminate()
        process.wait(timeout=30)


def make_bucket(name: str) -> None:
    import boto3

    boto3.client("s3").create_bucket(Bucket=name)


@contextmanager
def refusing_writes() -> Iterator[None]:
    """The server answers PUT and POST as a MinIO whose drives are full, until the block ends."""
    _REFUSE_WRITES.touch()
    try:
        yield
    finally:
        _REFUSE_WRITES.unlink()


_STORAGE_FULL = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>XMinioStorageFull</Code><Message>Storage backend has '
    b"reached its minimum free drive threshold. Please delete a few objects to proceed.</Message></Error>"
)


def _serve(port: int, refuse_writes: Path) -> None:
    """moto's server (as ``moto.server.main`` runs it), writes refused while ``refuse_writes`` exists."""
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import run_simple

    moto = DomainDispatcherApplication(create_backend_app)

    def app(environ, start_response):
        if environ["REQUEST_METHOD"] in ("PUT", "POST") and refuse_writes.exists():
            environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))  # the client waits to send it
            start_response("507 Insufficient Storage", [("Content-Type", "application/xml")])
            return [_STORAGE_FULL]
        return moto(environ, start_response)

    run_simple("127.0.0.1", port, app, threaded=True, request_handler=MotoRequestHandler)


if __name__ == "__main__":
    _serve(int(sys.argv[1]), Path(sys.argv[2]))
