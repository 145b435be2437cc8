"""A training run's lifecycle as an explicit state machine.

    PENDING -> RUNNING -> SUCCEEDED | FAILED | STOPPED
    PENDING -----------> SUCCEEDED | FAILED | STOPPED

The cluster (Ray Jobs) reports its own job status; :func:`state_of_job` maps it onto these
five states, and :class:`RunLifecycle` refuses what a run cannot do (leave an end state, go
back to pending), so a dropped or reordered report can never show a finished run as running.
"""

from __future__ import annotations

from enum import Enum


class RunState(str, Enum):
    """Where a run is. The string values are what the CLI prints and the dock shows."""

    PENDING = "pending"
    """Submitted; waiting for the cluster to start it (resources, runtime environment)."""
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    """Ended with a model folder."""
    FAILED = "failed"
    STOPPED = "stopped"
    """Ended because someone stopped it."""

    @property
    def ended(self) -> bool:
        return self in ENDED


ENDED = frozenset({RunState.SUCCEEDED, RunState.FAILED, RunState.STOPPED})

_NEXT: dict[RunState, frozenset[RunState]] = {
    RunState.PENDING: frozenset({RunState.RUNNING}) | ENDED,
    RunState.RUNNING: ENDED,
    **{state: frozenset() for state in ENDED},
}


def state_of_job(job_status: str) -> RunState:
    """The run state for a Ray ``JobStatus`` value (``"PENDING"``, ``"RUNNING"``, ...)."""
    value = str(getattr(job_status, "value", job_status)).upper()
    return {
        "PENDING": RunState.PENDING,
        "RUNNING": RunState.RUNNING,
        "SUCCEEDED": RunState.SUCCEEDED,
        "FAILED": RunState.FAILED,
        "STOPPED": RunState.STOPPED,
    }[value]


class RunLifecycle:
    """The current state of one run, changed only along the allowed transitions."""

    def __init__(self, state: RunState = RunState.PENDING) -> None:
        self.state = state

    def advance(self, new: RunState) -> bool:
        """Move to ``new``; returns whether the state changed.

        Staying is allowed; a transition the lifecycle does not have (``running -> pending``,
        anything out of an end state) is ignored and returns False: the cluster can report a
        stale status after a reconnect, and an ended run stays ended.
        """
        if new == self.state or new not in _NEXT[self.state]:
            return False
        self.state = new
        return True
