"""The fine-tune dock in a real napari viewer (Xvfb) against a real Ray head on 127.0.0.1.

Driven through the docks' buttons: annotate (commit reference objects), Fine-tune, follow the
run, the new model is active in the annotator; cancel; failures in plain words; reconnect.
"""

from __future__ import annotations

import json

import imageio.v3 as iio
import numpy as np
import pytest

from backend.dataset import open_dataset
from napari_raysam import cluster as clusters
from napari_raysam.finetune import SETTINGS_FILE
from napari_raysam.runs import RunState
from napari_raysam.widgets.annotator import COMMITTED_LAYER, CURRENT_LAYER, AnnotatorWidget
from napari_raysam.widgets.finetune import FinetuneWidget
from qt_helpers import click, wholly_in_view
from synthetic import synthetic_cells

pytestmark = pytest.mark.ray

RUN_TIMEOUT_MS = 400_000
SMALL_RUN = {"epochs": 2, "objects_per_batch": 2, "workers": 1}


def write_settings(tmp_path, cluster, **values) -> None:
    """What a user set in an earlier napari session (the dock reads it when it opens)."""
    settings = {"address": cluster.dashboard_url, "storage": str(tmp_path / "runs"),
                "dataset": str(tmp_path / "annotations.zarr"), **SMALL_RUN, **values}
    (tmp_path / "state").mkdir(exist_ok=True)
    (tmp_path / "state" / SETTINGS_FILE).write_text(json.dumps(settings))


def use_as_embedded(tmp_path, cluster) -> None:
    """Record the session's cluster as this test's embedded one, so an empty address reuses it (as the
    dock reuses the cluster an earlier napari session started) instead of starting another."""
    state = tmp_path / "state"  # this test's state folder (conftest's isolated_state)
    state.mkdir(exist_ok=True)
    (state / "auth_token").write_text(cluster.token)
    clusters.record_local_cluster(cluster, state / "auth_token")


@pytest.fixture
def docks(make_napari_viewer, qtbot, tmp_path, ray_cluster, monkeypatch, request):
    """A viewer with both docks; the annotator has committed reference objects on 3 slices.

    The dock's address is the cluster's, typed in; parametrized with "embedded" it is empty (the
    default: the cluster started on this computer, whose one-worker runs the job's driver trains)."""
    if getattr(request, "param", None) == "embedded":
        use_as_embedded(tmp_path, ray_cluster)
        write_settings(tmp_path, ray_cluster, address="")
    else:
        monkeypatch.setenv("RAY_AUTH_TOKEN", ray_cluster.token)
        write_settings(tmp_path, ray_cluster)
    viewer = make_napari_viewer(show=True)
    annotator = AnnotatorWidget(viewer, cache_dir=tmp_path / "cache")
    viewer.window.add_dock_widget(annotator, name="SAM annotator")
    rng = np.random.default_rng(5)
    pairs = [synthetic_cells(rng, shape=(96, 96), n_channels=1, n_cells=4) for _ in range(3)]
    viewer.add_image(np.stack([image[0] for image, _ in pairs]), name="cells")
    annotator.image.layout_combo.setCurrentIndex(0)  # the short first axis holds slices here, not channels
    annotator.model_panel.combo.setCurrentText("random:tiny")
    click(qtbot, annotator.model_panel.load_button)
    qtbot.waitUntil(lambda: not annotator.busy and annotator.model_source == "random:tiny", timeout=120_000)
    for z, (_, labels) in enumerate(pairs):
        viewer.dims.set_current_step(0, z)
        qtbot.waitUntil(lambda: not annotator.busy, timeout=120_000)
        click(qtbot, annotator.segment_panel.embed_button)
        qtbot.waitUntil(lambda: not annotator.busy and annotator.session.image_shape is not None, timeout=120_000)
        for object_id in np.unique(labels)[1:]:  # the reference objects, committed one by one
            annotator.layers.show(CURRENT_LAYER, (labels == object_id).astype(np.uint8))
            click(qtbot, annotator.segment_panel.commit_button)
    dock = FinetuneWidget(viewer)
    viewer.window.add_dock_widget(dock, name="Fine-tune")
    qtbot.waitUntil(lambda: dock.client is not None, timeout=120_000)  # connected in the background
    return viewer, annotator, dock


def wait_until_ended(qtbot, dock: FinetuneWidget) -> RunState:
    qtbot.waitUntil(lambda: dock.last_update is not None and dock.last_update.state.ended and dock._follower is None,
                    timeout=RUN_TIMEOUT_MS)
    return dock.last_update.state


@pytest.mark.parametrize("docks", ["embedded"], indirect=True)
def test_round_trip_annotate_fine_tune_and_the_annotator_uses_the_new_model(docks, qtbot, tmp_path):
    viewer, annotator, dock = docks
    click(qtbot, dock.finetune_button)
    qtbot.waitUntil(lambda: dock.run_name is not None or dock._task is None, timeout=120_000)
    assert dock.run_name is not None, dock.status.text()
    assert not dock.finetune_button.isEnabled()  # one run at a time
    assert wait_until_ended(qtbot, dock) == RunState.SUCCEEDED, dock.status.text()

    model = tmp_path / "runs" / dock.run_name / "model"
    qtbot.waitUntil(lambda: annotator.model_source == str(model) and not annotator.busy, timeout=120_000)
    assert "the annotator now uses" in dock.status.text()
    assert annotator.session.image_shape is not None  # same image encoder: the embeddings were kept
    assert len(dock.curves["val_iou"].getData()[0]) == 2  # one point per epoch
    assert "before training ->" in dock.result_label.text()  # the base model's validation, then the kept epoch's
    qtbot.waitUntil(lambda: dock.history_table.rowCount() == 1)
    assert dock.history_table.item(0, 0).text() == dock.run_name and dock.history_table.item(0, 4).text() == "3"
    config = json.loads((tmp_path / "runs" / dock.run_name / "config.json").read_text())
    assert config["launcher"] == "driver"  # one worker on the embedded cluster: no Ray Train processes to wait for

    dataset = open_dataset(tmp_path / "annotations.zarr")
    assert len(dataset.sample_ids()) == 3 and dataset.sample_ids("val")
    fingerprint = annotator.session.model.encoder_fingerprint
    assert all(dataset.embedding(s, fingerprint) is not None for s in dataset.sample_ids())  # carried over

    # screenshots, looked at by hand: the window with both docks, and the fine-tune dock whole
    screenshot = viewer.screenshot(canvas_only=False, flash=False)
    assert screenshot.std() > 0
    iio.imwrite(tmp_path.parent / "window_with_docks.png", screenshot)
    dock.resize(460, dock.height())
    dock.scroll_area.widget().grab().save(str(tmp_path.parent / "finetune_dock.png"))  # the scrolling part, all of it
    dock.grab().save(str(tmp_path.parent / "finetune_dock_shown.png"))  # as shown: the buttons, progress, status below

    # a second click exports nothing twice: the images are unchanged
    click(qtbot, dock.finetune_button)
    qtbot.waitUntil(lambda: "exported:" in dock.status.text() or dock._task is None, timeout=120_000)
    assert "0 new, 0 updated, 3 unchanged" in dock.status.text()
    assert len(open_dataset(tmp_path / "annotations.zarr").sample_ids()) == 3
    click(qtbot, dock.cancel_button)
    assert wait_until_ended(qtbot, dock) in (RunState.STOPPED, RunState.SUCCEEDED)


def test_cancel_stops_the_run_leaves_the_annotations_and_resume_continues_it(docks, qtbot, tmp_path):
    viewer, annotator, dock = docks
    dock.form.epochs_spin.setValue(500)
    click(qtbot, dock.finetune_button)
    qtbot.waitUntil(lambda: dock.last_update is not None, timeout=120_000)
    assert not dock.resume_button.isEnabled()  # nothing to resume while it runs
    qtbot.waitUntil(lambda: bool(dock.last_update.metrics), timeout=RUN_TIMEOUT_MS)  # an epoch (and its checkpoint)
    click(qtbot, dock.cancel_button)
    assert wait_until_ended(qtbot, dock) == RunState.STOPPED
    assert "was stopped" in dock.status.text()
    assert annotator.model_source == "random:tiny"
    assert viewer.layers[COMMITTED_LAYER].data.max() > 0

    click(qtbot, dock.resume_button)  # from its last finished epoch, under the same run name
    name = dock.run_name
    qtbot.waitUntil(lambda: "resuming after epoch" in dock.log_view.toPlainText(), timeout=RUN_TIMEOUT_MS)
    assert dock.run_name == name and dock.last_update.state == RunState.RUNNING
    click(qtbot, dock.cancel_button)
    assert wait_until_ended(qtbot, dock) == RunState.STOPPED


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("address_edit", "127.0.0.1:9", "cannot reach a Ray cluster"),
        ("token_edit", "not-the-token", "rejected the token"),
        ("model_edit", "/no/such/model", "no file or folder"),
        ("storage_edit", "/proc/runs", "cannot write to the storage folder"),
    ],
)
def test_failures_are_one_plain_line(docks, qtbot, field, value, message):
    viewer, annotator, dock = docks
    getattr(dock.form, field).setText(value)
    dock.client = None  # the fields changed: connect again
    click(qtbot, dock.finetune_button)
    qtbot.waitUntil(lambda: dock._task is None, timeout=60_000)
    assert message in dock.status.text() and "\n" not in dock.status.text()
    assert dock.run_name is None
    assert annotator.model_source == "random:tiny"


def test_a_failing_job_says_why(docks, qtbot, tmp_path):
    viewer, annotator, dock = docks
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    dock.form.model_edit.setText(str(broken))
    click(qtbot, dock.finetune_button)
    assert wait_until_ended(qtbot, dock) == RunState.FAILED
    assert f"run '{dock.run_name}' failed" in dock.status.text()
    assert "broken.pt" in dock.status.text(), dock.status.text()  # the reason itself, not "exit code 1"
    assert "broken.pt" in dock.log_view.toPlainText()


def test_closing_and_reopening_the_dock_finds_the_run(docks, qtbot, tmp_path):
    viewer, annotator, dock = docks
    dock.form.epochs_spin.setValue(500)
    click(qtbot, dock.finetune_button)
    qtbot.waitUntil(lambda: dock.last_update is not None, timeout=120_000)
    name = dock.run_name
    viewer.window.remove_dock_widget(dock)
    dock.close()

    reopened = FinetuneWidget(viewer)
    viewer.window.add_dock_widget(reopened, name="Fine-tune")
    qtbot.waitUntil(lambda: reopened.run_name == name and reopened.last_update is not None, timeout=120_000)
    assert "still going" in reopened.status.text() or reopened.last_update.state == RunState.RUNNING
    click(qtbot, reopened.cancel_button)
    assert wait_until_ended(qtbot, reopened) == RunState.STOPPED


def test_opening_the_dock_starts_no_cluster_the_first_fine_tune_does(make_napari_viewer, qtbot, tmp_path, ray_cluster,
                                                                      monkeypatch):
    """The embedded Ray outlives napari (its runs do): a user who only looks at the dock must not be left
    with one running. Nothing annotated then says so plainly."""
    starts = []

    def start_local_cluster():  # stands in for starting one: the session's cluster
        starts.append(1)
        return ray_cluster

    monkeypatch.setattr("napari_raysam.finetune.start_local_cluster", start_local_cluster)
    write_settings(tmp_path, ray_cluster, address="", base_model="random:tiny")
    viewer = make_napari_viewer(show=True)
    _, loading = viewer.window.add_plugin_dock_widget("napari-raysam", "Fine-tune")  # what `napari -w` opens
    dock = loading.widget
    assert isinstance(dock, FinetuneWidget)
    qtbot.waitUntil(lambda: dock._task is None, timeout=60_000)
    assert dock.client is None and not starts and clusters.running_local_cluster() is None
    assert "starts with the first fine-tune" in dock.status.text()
    click(qtbot, dock.finetune_button)  # opens the annotator too: the dock works through it
    assert "starting the local Ray cluster" in dock.status.text()
    qtbot.waitUntil(lambda: dock._task is None, timeout=60_000)
    assert starts == [1]
    assert "no committed objects" in dock.status.text()
    assert isinstance(dock.annotator(), AnnotatorWidget)


def test_an_annotator_opened_after_the_dock_is_followed(make_napari_viewer, qtbot, tmp_path, ray_cluster):
    """`napari -w napari-raysam` loads both docks in the background: the annotator may come second."""
    write_settings(tmp_path, ray_cluster)
    viewer = make_napari_viewer(show=True)
    dock = FinetuneWidget(viewer)
    viewer.window.add_dock_widget(dock, name="Fine-tune")
    annotator = AnnotatorWidget(viewer, cache_dir=tmp_path / "cache")
    viewer.window.add_dock_widget(annotator, name="SAM annotator")
    annotator.model_panel.combo.setCurrentText("random:tiny")
    click(qtbot, annotator.model_panel.load_button)
    qtbot.waitUntil(lambda: "random:tiny" in dock.form.model_edit.placeholderText(), timeout=120_000)
    assert dock.annotator() is annotator


def test_on_a_laptop_screen_both_docks_keep_their_buttons_progress_and_messages_in_view(make_napari_viewer, qtbot, tmp_path):
    """napari stacks the fine-tune dock under the annotator. In a 740 px window (a 768 px laptop screen) it
    got ~80 px: its settings' first rows, while its buttons, its progress bar and its status line, where
    every error appears, lay below, reachable only by scrolling. Now they stay in view under the scrolling
    part, as the annotator's status line does, and napari's window stays on the screen."""
    viewer = make_napari_viewer(show=True)
    window = viewer.window._qt_window
    window.resize(1300, 740)
    annotator = AnnotatorWidget(viewer, cache_dir=tmp_path / "cache")
    viewer.window.add_dock_widget(annotator, name="SAM annotator")
    dock = FinetuneWidget(viewer)
    viewer.window.add_dock_widget(dock, name="Fine-tune")
    dock._say("a message long enough to wrap onto a second line of the status line, as the errors do, "
              "which tell the user in plain words what to do next")

    qtbot.waitUntil(lambda: dock.scroll_area.verticalScrollBar().maximum() > 0)  # the settings scroll
    for widget in (dock.finetune_button, dock.cancel_button, dock.state_label, dock.progress_bar, dock.status,
                   annotator.status):
        qtbot.waitUntil(lambda widget=widget: wholly_in_view(widget))
    assert window.height() < 768
    iio.imwrite(tmp_path.parent / "both_docks_laptop.png", viewer.screenshot(canvas_only=False, flash=False))
