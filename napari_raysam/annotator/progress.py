"""Progress reports of the annotator's slow work, as ``progress(done, total)`` callbacks."""

from __future__ import annotations

from collections.abc import Callable

ProgressCallback = Callable[[int, int], None]
"""Called as ``progress(done, total)``, from the thread doing the work."""


class MicroSamProgress:
    """Turns micro-sam's ``pbar_init(total, description)``, ``pbar_update(n)`` into ``progress(done, total)``.

    Reports ``(0, 1)`` when created and ``(total, total)`` on :meth:`finish` if micro-sam did
    not get there, so a caller always sees a start and an end (loading from the cache reports
    nothing else).
    """

    def __init__(self, progress: ProgressCallback | None) -> None:
        self._progress = progress
        self._done, self._total = 0, 1
        self._report()

    def init(self, total: int, description: str = "") -> None:
        self._done, self._total = 0, max(int(total), 1)
        self._report()

    def update(self, n: int = 1) -> None:
        self._done = min(self._done + int(n), self._total)
        self._report()

    def finish(self) -> None:
        if self._done < self._total:
            self._done = self._total
            self._report()

    def _report(self) -> None:
        if self._progress is not None:
            self._progress(self._done, self._total)
