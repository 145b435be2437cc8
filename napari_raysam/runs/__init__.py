"""The run client, without Qt: cluster connection, run lifecycle, run files, dock settings.

The CLI's ``train`` / ``runs ...`` commands and the fine-tune dock both use it.
"""

from napari_raysam.runs.client import RunClient, RunError, RunFailed, RunInfo, RunUpdate
from napari_raysam.runs.files import MetricsReader, RunRecord, fetch_model, model_folder, read_progress, run_history
from napari_raysam.runs.state import RunLifecycle, RunState

__all__ = [
    "MetricsReader", "RunClient", "RunError", "RunFailed", "RunInfo", "RunLifecycle", "RunRecord", "RunState",
    "RunUpdate", "fetch_model", "model_folder", "read_progress", "run_history",
]
