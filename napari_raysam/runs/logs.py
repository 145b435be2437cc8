"""Following a job's log as it grows, without fetching the whole log again.

Ray Jobs streams a job's output over a websocket (``JobSubmissionClient.tail_job_logs``): only
new text travels. :class:`LogTail` runs that stream in a thread of its own and hands the text
over through a queue; after a dropped connection it connects again, and since Ray then sends
the log from its start, the text already seen is skipped.
"""

from __future__ import annotations

import asyncio
import collections
import queue
import threading
from collections.abc import Callable

from ray.job_submission import JobSubmissionClient

KEPT_LINES = 200
"""Last log lines kept for an error message."""


class LogTail:
    """The new text of one job's log, delivered by :meth:`take`.

    Lifecycle: ``start()``, then ``take()`` as often as wanted, then ``close()`` (or
    ``finish()`` after the job ended, to wait for its last lines).
    """

    def __init__(
        self, make_client: Callable[[], JobSubmissionClient], job_id: str, max_reconnects: int = 20
    ) -> None:
        self._make_client = make_client
        self.job_id = job_id
        self.max_reconnects = max_reconnects
        self.last_lines: collections.deque[str] = collections.deque(maxlen=KEPT_LINES)
        self.error: Exception | None = None
        """Set when the stream could not be had even after reconnecting."""
        self._queue: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._seen = 0  # characters of the log delivered so far
        self._partial = ""  # the last, unfinished line, for last_lines
        self._thread = threading.Thread(target=self._run, name=f"log-tail-{job_id}", daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None
        self._closing = threading.Event()

    def start(self) -> None:
        self._thread.start()

    def take(self) -> str:
        """The text that arrived since the last call ("" if none)."""
        parts = []
        while True:
            try:
                parts.append(self._queue.get_nowait())
            except queue.Empty:
                return "".join(parts)

    def finish(self, timeout: float = 5.0) -> None:
        """After the job ended: wait up to ``timeout`` s for Ray to send the rest and close."""
        self._thread.join(timeout)
        self.close()

    def close(self) -> None:
        """Stop following (the job itself is not touched)."""
        self._closing.set()
        loop, task = self._loop, self._task
        if loop is not None and task is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(task.cancel)
            except RuntimeError:  # the loop closed in between
                pass
        self._thread.join(2.0)

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            if self._closing.is_set():  # closed before the thread got here
                return
            self._task = loop.create_task(self._pump())
            loop.run_until_complete(self._task)  # a cancel() from close() queued meanwhile runs in here
        except asyncio.CancelledError:
            pass
        finally:
            loop.close()

    async def _pump(self) -> None:
        failures = 0
        while not self._closing.is_set():
            received = 0
            try:
                async for chunk in self._make_client().tail_job_logs(self.job_id):
                    new = chunk[max(0, self._seen - received):]
                    received += len(chunk)
                    if new:
                        self._seen = received
                        self._deliver(new)
                    failures = 0
                return  # Ray closed the stream normally: the job has ended
            except asyncio.CancelledError:
                raise
            except Exception as error:  # dropped connection, cluster restarting, proxy timeout
                failures += 1
                if failures > self.max_reconnects:
                    self.error = error
                    return
                await asyncio.sleep(min(2.0**failures, 10.0))

    def _deliver(self, text: str) -> None:
        self._queue.put(text)
        lines = (self._partial + text).split("\n")
        self._partial = lines.pop()
        self.last_lines.extend(lines)

    def tail(self, lines: int = 30) -> str:
        """The last ``lines`` lines received."""
        kept = list(self.last_lines) + ([self._partial] if self._partial else [])
        return "\n".join(kept[-lines:])
