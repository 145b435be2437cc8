"""The "Fine-tune" dock: annotations -> one click -> a run on the cluster -> the new model in the annotator.

Thin by design: the export and submission are :func:`napari_raysam.finetune.submit_finetune`,
following and stopping runs is :class:`napari_raysam.runs.RunClient`, the run history is
:func:`napari_raysam.runs.run_history`. This module puts them behind fields, buttons, a live
plot and thread workers; nothing slow runs on the GUI thread, and errors are one plain line.
"""

from __future__ import annotations

import time
from pathlib import Path

import napari
import pyqtgraph
from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import (
    QAbstractItemView,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from backend.config import ConfigError
from backend.dataset import DatasetError
from backend.models import ModelError
from napari_raysam.cluster import ClusterError
from napari_raysam.finetune import FinetuneError, FinetuneSettings, Submission, running_cluster, submit_finetune
from napari_raysam.runs import RunClient, RunError, RunRecord, RunState, RunUpdate, run_history
from napari_raysam.runs.progress import progress_fraction, progress_text, summary_text
from napari_raysam.widgets.annotator import AnnotatorWidget, annotator_for
from napari_raysam.widgets.finetune_form import SettingsForm
from napari_raysam.widgets.scrolling import ContentScroll
from napari_raysam.widgets.tasks import failure_message, start_task

_USER_ERRORS = (FinetuneError, ClusterError, RunError, DatasetError, ModelError, ConfigError, OSError)
_LOG_LINES = 300
_HISTORY_COLUMNS = ("run", "date", "base model", "mode", "images", "val IoU")


class FinetuneWidget(QWidget):
    """Dock widget: fine-tune on the annotator's annotations, follow the run, load its model."""

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.client: RunClient | None = None
        self.run_name: str | None = None  # the run shown (followed, or ended)
        self.last_update: RunUpdate | None = None
        self._update_clock = 0.0  # time.monotonic() when last_update arrived, for the elapsed clock
        self._task = None  # connect / submit / stop worker
        self._follower = None  # follow worker
        self._stop_following = False
        self._pending_model: Path | None = None  # a finished run's model, not loaded yet
        self._loading: str | None = None  # the model the annotator was asked to load
        self._history: list[RunRecord] = []
        self.last_submission: Submission | None = None  # what the last click exported and submitted
        self._client_address: str | None = None  # the address self.client was connected with
        self._build_ui(FinetuneSettings.load())
        self._clock = QTimer(self, interval=1000)
        self._watched: AnnotatorWidget | None = None  # the annotator whose model this dock shows
        self._clock.timeout.connect(self._show_progress)
        self._clock.timeout.connect(self._watch_annotator)
        self._clock.start()
        self._watch_annotator()
        self._connect_and_reconnect()

    # ------------------------------------------------------------------ UI
    def _build_ui(self, settings: FinetuneSettings) -> None:
        # napari stacks this dock under the annotator: a squeezed dock scrolls its settings, plot and
        # history; the buttons, the run's progress and the status line stay in view below them
        content = QWidget()
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        self.scroll_area = ContentScroll(content)
        outer.addWidget(self.scroll_area)
        layout = QVBoxLayout(content)
        self.form = SettingsForm(settings)
        layout.addWidget(self.form)

        actions = QHBoxLayout()
        self.finetune_button = QPushButton("Fine-tune on cluster", toolTip="Export what is new, train, follow the run")
        self.finetune_button.clicked.connect(self.fine_tune)
        self.cancel_button = QPushButton("Cancel", toolTip="Stop the run on the cluster")
        self.cancel_button.clicked.connect(self.cancel)
        self.resume_button = QPushButton(
            "Resume", toolTip="Continue the failed or stopped run from its last finished epoch"
        )
        self.resume_button.clicked.connect(self.resume)
        self.load_button = QPushButton("Load model", toolTip="Load the finished run's model into the annotator")
        self.load_button.clicked.connect(lambda: self._load_model(self._pending_model))
        for button in (self.finetune_button, self.cancel_button, self.resume_button, self.load_button):
            actions.addWidget(button)
        self.state_label = QLabel("no run yet", wordWrap=True)
        self.progress_bar = QProgressBar(minimum=0, maximum=1000, format="%p%")
        self.plot = pyqtgraph.GraphicsLayoutWidget()
        self.plot.setBackground("#262930")  # napari's dark theme
        self.plot.setFixedHeight(190)
        loss_plot = self.plot.addPlot(title="loss")
        loss_plot.addLegend(offset=(-5, 5), labelTextSize="8pt")
        iou_plot = self.plot.addPlot(title="val IoU")
        self._plots = (loss_plot, iou_plot)
        for plot in self._plots:
            plot.setLabel("bottom", "epoch")
            plot.showGrid(x=True, y=True, alpha=0.2)
        iou_plot.setYRange(0, 1)
        self.curves = {
            "train_loss": loss_plot.plot(pen=pyqtgraph.mkPen("#4fc3f7", width=2), symbol="o", symbolSize=5, name="train"),
            "val_loss": loss_plot.plot(pen=pyqtgraph.mkPen("#ffb74d", width=2), symbol="s", symbolSize=5, name="val"),
            "val_iou": iou_plot.plot(pen=pyqtgraph.mkPen("#81c784", width=2), symbol="o", symbolSize=5),
        }
        layout.addWidget(self.plot)
        self.result_label = QLabel("", wordWrap=True)
        layout.addWidget(self.result_label)
        self.log_view = QPlainTextEdit(readOnly=True, maximumBlockCount=_LOG_LINES, placeholderText="the run's log")
        self.log_view.setMaximumHeight(90)
        layout.addWidget(self.log_view)

        history_box = QGroupBox("Run history")
        history = QVBoxLayout(history_box)
        self.history_table = QTableWidget(0, len(_HISTORY_COLUMNS), editTriggers=QAbstractItemView.EditTrigger.NoEditTriggers,
                                          selectionBehavior=QAbstractItemView.SelectionBehavior.SelectRows,
                                          selectionMode=QAbstractItemView.SelectionMode.SingleSelection)
        self.history_table.setHorizontalHeaderLabels(_HISTORY_COLUMNS)
        self.history_table.verticalHeader().setVisible(False)
        self.history_table.setTextElideMode(Qt.TextElideMode.ElideLeft)  # run names share their date prefix
        self.history_table.setMaximumHeight(130)
        history.addWidget(self.history_table)
        row = QHBoxLayout()
        self.load_history_button = QPushButton("Load selected model", toolTip="Load that run's model into the annotator (rollback)")
        self.load_history_button.clicked.connect(self._load_selected)
        refresh = QPushButton("Refresh", toolTip="Read the storage folder again")
        refresh.clicked.connect(self.refresh_history)
        row.addWidget(self.load_history_button)
        row.addWidget(refresh)
        history.addLayout(row)
        layout.addWidget(history_box)

        self.status = QLabel("", wordWrap=True)
        self.status.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        always_shown = QVBoxLayout()
        always_shown.setContentsMargins(9, 0, 9, 9)
        always_shown.addLayout(actions)
        for widget in (self.state_label, self.progress_bar, self.status):
            always_shown.addWidget(widget)
        outer.addLayout(always_shown)
        outer.addStretch(1)
        self._update_buttons()

    def _say(self, text: str) -> None:
        self.status.setText(text)

    def _update_buttons(self) -> None:
        running = self._follower is not None and self.last_update is not None and not self.last_update.state.ended
        following = self._follower is not None
        self.finetune_button.setEnabled(self._task is None and not following)
        self.cancel_button.setEnabled(following and self.run_name is not None)
        ended = self.last_update is not None and self.last_update.state in (RunState.FAILED, RunState.STOPPED)
        self.resume_button.setEnabled(self._task is None and not following and ended and bool(self.last_update.metrics))
        self.load_button.setEnabled(self._pending_model is not None)
        self.load_history_button.setEnabled(bool(self._history))
        self.cancel_button.setToolTip("Stop the run on the cluster" if running else "Stop the run before it starts")

    # ------------------------------------------------------------------ settings
    def current_settings(self) -> FinetuneSettings:
        """The fields as settings (raises FinetuneError for a value that is not a number)."""
        return self.form.settings()

    def _show_annotator_model(self, source: str) -> None:
        self.form.model_edit.setPlaceholderText(f"the annotator's model ({source})")
        if source == self._loading:
            self._say(f"the annotator now uses {Path(source).parent.name}'s model")
            self._loading = None

    def annotator(self) -> AnnotatorWidget:
        """The SAM annotator of this viewer, opened when it is not."""
        annotator = annotator_for(self.viewer)
        if annotator is None:
            # built at once, not in the background: this dock's module imported the annotator's
            self.viewer.window.add_plugin_dock_widget("napari-raysam", "SAM annotator")
            annotator = annotator_for(self.viewer)
        if annotator is not self._watched:
            annotator.model_changed.connect(self._show_annotator_model)
            self._watched = annotator
            if annotator.model_source is not None:
                self._show_annotator_model(annotator.model_source)
        return annotator

    def _watch_annotator(self) -> None:
        """Show the model of an annotator that opened after this dock too (napari -w opens both docks,
        each loading in the background)."""
        if annotator_for(self.viewer) not in (None, self._watched):
            self.annotator()

    # ------------------------------------------------------------------ workers
    def _run_task(self, message: str, task, done) -> None:
        """``task()`` in a worker thread, ``done(result)`` back on the GUI thread; one at a time."""
        self._say(message)
        self._task = start_task(task, done=done, failed=self._failed, finished=self._task_finished)
        self._update_buttons()

    def _task_finished(self) -> None:
        self._task = None
        self._update_buttons()

    def _failed(self, error: Exception) -> None:
        # the first line in the status line, the details (a cluster's log, say) in the log view
        first, _, rest = failure_message(error, _USER_ERRORS, "fine-tune").partition("\n")
        self._say(first)
        if rest:
            self.log_view.appendPlainText(rest)

    # ------------------------------------------------------------------ verbs
    def fine_tune(self) -> None:
        """Export what the annotator committed and not yet exported, submit the run, follow it."""
        if self._task is not None or self._follower is not None:
            return
        try:
            settings = self.current_settings()
        except FinetuneError as error:
            self._say(str(error))
            return
        settings.save()
        annotator = self.annotator()
        images, model, embeddings = annotator.annotated_images(), annotator.model_source, annotator.embedding_source()
        token, cluster = self.form.token(), self.client.cluster if self._same_cluster(settings) else None
        starting = cluster is None and not settings.address.strip()
        self._run_task(
            ("starting the local Ray cluster, " if starting else "") + "exporting the annotations and submitting…",
            lambda: submit_finetune(settings, images, annotator.store, annotator_model=model, embeddings=embeddings,
                                    token=token, cluster=cluster),
            self._submitted,
        )

    def _same_cluster(self, settings: FinetuneSettings) -> bool:
        return self.client is not None and settings.address == self._client_address

    def _submitted(self, submission: Submission) -> None:
        self.last_submission = submission
        self.client, self._client_address = submission.client, self.current_settings().address
        self._say(f"exported: {submission.export.summary()}. Submitted run {submission.run.name}")
        self.follow(submission.run.name)

    def follow(self, run_name: str) -> None:
        """Show the run's progress until it ends (on a worker thread)."""
        self.run_name, self.last_update, self._pending_model = run_name, None, None
        self.log_view.clear()
        self.result_label.clear()
        for curve in self.curves.values():
            curve.setData([], [])
        self._stop_following = False
        client = self.client

        def updates():
            yield from client.follow(run_name, should_stop=lambda: self._stop_following)

        self._follower = start_task(updates, yielded=self._on_update, failed=self._failed, finished=self._follow_finished)
        self._update_buttons()

    def _follow_finished(self) -> None:
        self._follower = None
        self._update_buttons()

    def cancel(self) -> None:
        """Ask the cluster to stop the followed run (its state then shows "stopped")."""
        if self.client is None or self.run_name is None:
            return
        client, name = self.client, self.run_name
        self._run_task(f"stopping run {name}…", lambda: client.stop(name), lambda _: None)

    def resume(self) -> None:
        """Continue the followed run, which failed or was stopped, from its last epoch checkpoint."""
        if self.client is None or self.run_name is None:
            return
        client, name = self.client, self.run_name
        self._run_task(f"resuming run {name}…", lambda: client.resume(name), lambda run: self.follow(run.name))

    def _connect_and_reconnect(self) -> None:
        """Connect in the background to the cluster if it runs (the embedded one is not started
        here: it starts on the first fine-tune), show the history, and follow this project's
        newest run that is still going (napari was closed meanwhile)."""
        try:
            settings = self.current_settings()
        except FinetuneError:
            settings = FinetuneSettings()
        token = self.form.token()

        def connect():
            cluster = running_cluster(settings.address, token)
            if cluster is None:
                return None, None
            client = RunClient(cluster)
            going = [run for run in client.runs() if not run.state.ended]
            return client, going[0].name if going else None

        def connected(result) -> None:
            self.client, running = result
            if self.client is None:
                self._say("the local Ray cluster starts with the first fine-tune (it takes a few seconds)")
                return
            self._client_address = settings.address
            self._say(f"connected to {self.client.cluster.dashboard_url}")
            if running is not None and self._follower is None:
                self._say(f"found run {running} still going: following it")
                self.follow(running)

        self._run_task("connecting to the cluster…", connect, connected)
        self.refresh_history()

    # ------------------------------------------------------------------ updates
    def _on_update(self, update: RunUpdate) -> None:
        model_arrived = update.model is not None and (self.last_update is None or self.last_update.model is None)
        self.last_update, self._update_clock = update, time.monotonic()
        if update.new_log:
            self.log_view.appendPlainText(update.new_log.rstrip("\n"))
        epochs = [line["epoch"] + 1 for line in update.metrics]
        for key, curve in self.curves.items():
            curve.setData(epochs, [line[key] for line in update.metrics])
        for plot in self._plots:  # whole epochs only, about eight ticks
            plot.getAxis("bottom").setTickSpacing(max(1, len(epochs) // 8), 1)
        self._show_progress()
        if update.message and not update.state.ended:
            self._say(update.message)
        if model_arrived:
            self._model_arrived(update.model)
        if update.state.ended:
            self._ended(update)
        self._update_buttons()

    def _show_progress(self) -> None:
        update = self.last_update
        if update is None or self.run_name is None:
            return
        running = update.state == RunState.RUNNING
        elapsed = update.elapsed_s + (time.monotonic() - self._update_clock if running else 0.0)
        self.state_label.setText(f"<b>{self.run_name}</b>: {progress_text(update, elapsed)}")
        self.progress_bar.setValue(int(1000 * progress_fraction(update, elapsed)))

    def _model_arrived(self, model: Path) -> None:
        """The run's model folder is complete: load it (or offer it) now, not when Ray has ended the job,
        which takes it seconds more."""
        self._pending_model = model
        if self.form.load_when_done.isChecked():
            self._load_model(model)
        else:
            self._say(f"run {self.run_name} has its model: Load model puts it into the annotator")

    def _ended(self, update: RunUpdate) -> None:
        self.result_label.setText(summary_text(update.metrics, update.baseline))
        self.refresh_history()
        if update.state == RunState.STOPPED:
            self._say(f"run {self.run_name} was stopped; your annotations are unchanged")
        elif update.state == RunState.FAILED:  # a success's model arrived with it or before it
            first, _, rest = update.message.partition("\n")
            self._say(first or f"run {self.run_name} failed")
            if rest:
                self.log_view.appendPlainText(rest)

    def _load_model(self, model: Path | None) -> None:
        if model is None:
            return
        self._loading = str(model)
        self.annotator().load_model(str(model))
        self._pending_model = None
        self._say(f"loading {model} into the annotator…")
        self._update_buttons()

    # ------------------------------------------------------------------ history
    def refresh_history(self) -> None:
        """Read the storage folder's runs (in the background) into the history table."""
        try:
            storage = self.current_settings().storage_path
        except FinetuneError:
            return
        start_task(run_history, storage, done=self._show_history, failed=self._failed)

    def _show_history(self, records: list[RunRecord]) -> None:
        self._history = records
        self.history_table.setRowCount(len(records))
        for row, record in enumerate(records):
            cells = (
                record.name, record.created.astimezone().strftime("%Y-%m-%d %H:%M"), record.base_model, record.mode,
                "" if record.images is None else str(record.images),
                "" if record.val_iou is None else f"{record.val_iou:.3f}",
            )
            for column, text in enumerate(cells):
                item = QTableWidgetItem(text)
                item.setToolTip(str(record.model or f"{record.run_dir} (no model)"))
                self.history_table.setItem(row, column, item)
        self.history_table.resizeColumnsToContents()
        self.history_table.setColumnWidth(0, min(self.history_table.columnWidth(0), 150))  # the full name is the tooltip
        self._update_buttons()

    def _load_selected(self) -> None:
        rows = self.history_table.selectionModel().selectedRows()
        if not rows:
            self._say("select a run in the history first")
            return
        record = self._history[rows[0].row()]
        if record.model is None:
            self._say(f"run {record.name} has no model (it did not finish)")
            return
        self._load_model(record.model)

    def closeEvent(self, event) -> None:  # noqa: N802 - Qt's name
        """Stop following (the run goes on on the cluster; reopening the dock finds it)."""
        self._stop_following = True
        super().closeEvent(event)
