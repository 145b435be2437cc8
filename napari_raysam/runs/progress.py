"""How far a run is, in words and as a fraction: what the dock's label and bar show."""

from __future__ import annotations

from backend.run_directory import kept_epoch
from napari_raysam.runs.client import RunUpdate
from napari_raysam.runs.state import RunState


def clock(seconds: float) -> str:
    """``m:ss`` (or ``h:mm:ss``)."""
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def progress_fraction(update: RunUpdate, elapsed_s: float) -> float:
    """0..1: by the time budget when the run has one, else by steps over all epochs."""
    if update.state == RunState.SUCCEEDED:
        return 1.0
    progress = update.progress
    if not progress:
        return 0.0
    if progress.get("budget_s"):
        return min(1.0, float(progress.get("elapsed_s", 0.0)) / float(progress["budget_s"]))
    steps = max(1, int(progress["steps_per_epoch"]))
    return min(1.0, (progress["epoch"] * steps + progress["step"]) / (max(1, int(progress["epochs"])) * steps))


def progress_text(update: RunUpdate, elapsed_s: float) -> str:
    """One line: the state, then epoch and step while running, then the elapsed time."""
    state = update.state
    if state == RunState.PENDING:
        return "pending: waiting for the cluster to start it"
    if state.ended:
        return f"{state.value} after {clock(elapsed_s)}"
    progress = update.progress
    if not progress:
        return f"running: loading the model and data… {clock(elapsed_s)}"
    budget = f" of at most {clock(progress['budget_s'])}" if progress.get("budget_s") else ""
    return (
        f"running: epoch {progress['epoch'] + 1}/{progress['epochs']}, step {progress['step']}/"
        f"{progress['steps_per_epoch']}, {clock(elapsed_s)}{budget}"
    )


def summary_text(metrics: list[dict], baseline: dict | None = None) -> str:
    """Before/after on the validation images: the base model (or, without a baseline, the first
    epoch) against the epoch whose model is kept (``backend.run_directory.kept_epoch``)."""
    best = kept_epoch(metrics)
    if best is None:
        return "no epoch finished"
    before, when = (baseline, "before training") if baseline else (metrics[0], f"after epoch {metrics[0]['epoch'] + 1}")
    return (
        f"validation: IoU {before['val_iou']:.3f} {when} -> {best['val_iou']:.3f} (kept: epoch {best['epoch'] + 1}); "
        f"loss {before['val_loss']:.3f} -> {best['val_loss']:.3f}"
    )
