"""The fine-tune dock's settings fields: cluster, training, advanced; to and from FinetuneSettings."""

from __future__ import annotations

from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QSpinBox,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from backend.config import MODES
from napari_raysam.finetune import FinetuneError, FinetuneSettings


class SettingsForm(QWidget):
    """Fields with defaults and tooltips, filled from saved settings; the token is never saved."""

    def __init__(self, settings: FinetuneSettings) -> None:
        super().__init__()
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        cluster_box = QGroupBox("Cluster")
        form = QFormLayout(cluster_box)
        self.address_edit = QLineEdit(settings.address, placeholderText="empty: a local Ray on this computer",
                                      toolTip="Ray dashboard address of the cluster, e.g. http://head:8265")
        form.addRow("Address", self.address_edit)
        self.token_edit = QLineEdit(echoMode=QLineEdit.EchoMode.Password, placeholderText="from RAY_AUTH_TOKEN or ~/.ray/auth_token",
                                    toolTip="The cluster's Ray auth token (never saved); empty: the environment or token file")
        form.addRow("Token", self.token_edit)
        self.storage_edit = QLineEdit(settings.storage, placeholderText=str(settings.storage_path),
                                      toolTip="Folder or object-store URI (s3://bucket/runs) for the run folders; on a cluster, "
                                      "storage every node can reach (the dataset is uploaded there when needed)")
        form.addRow("Storage", self.storage_edit)
        layout.addWidget(cluster_box)

        training_box = QGroupBox("Training")
        form = QFormLayout(training_box)
        self.dataset_edit = QLineEdit(settings.dataset, placeholderText=str(settings.dataset_path),
                                      toolTip="Dataset the annotations are exported to (each image once)")
        form.addRow("Dataset", self.dataset_edit)
        self.model_edit = QLineEdit(settings.base_model, placeholderText="the annotator's model",
                                    toolTip="Model to fine-tune; empty: the model loaded in the SAM annotator")
        form.addRow("Base model", self.model_edit)
        self.mode_combo = QComboBox(toolTip="decoder: fast, keeps the image encoder (embeddings stay valid); "
                                            "full / lora: also adapt the image encoder (slow without a GPU)")
        self.mode_combo.addItems(MODES)
        self.mode_combo.setCurrentText(settings.mode)
        form.addRow("Mode", self.mode_combo)
        self.epochs_spin = QSpinBox(minimum=1, maximum=1000, value=settings.epochs, toolTip="Passes over the annotated images")
        self.minutes_spin = QDoubleSpinBox(minimum=0, maximum=24 * 60, value=settings.minutes, decimals=1, suffix=" min",
                                           specialValueText="no limit", toolTip="Stop after this long and keep the best model")
        row = QHBoxLayout()
        row.addWidget(self.epochs_spin)
        row.addWidget(QLabel("at most"))
        row.addWidget(self.minutes_spin)
        form.addRow("Epochs", row)
        self.workers_spin = QSpinBox(minimum=1, maximum=64, value=settings.workers, toolTip="Ray Train workers (data parallel)")
        self.gpu_spin = QSpinBox(minimum=0, maximum=1, value=settings.gpus_per_worker, toolTip="GPUs per worker (0: CPU)")
        row = QHBoxLayout()
        row.addWidget(self.workers_spin)
        row.addWidget(QLabel("GPU each"))
        row.addWidget(self.gpu_spin)
        form.addRow("Workers", row)
        self.advanced_button = QToolButton(text="Advanced", checkable=True, arrowType=Qt.ArrowType.RightArrow,
                                           toolButtonStyle=Qt.ToolButtonStyle.ToolButtonTextBesideIcon)
        self.advanced_box = QWidget(visible=False)
        advanced = QFormLayout(self.advanced_box)
        advanced.setContentsMargins(12, 0, 0, 0)
        self.lr_edit = QLineEdit(f"{settings.lr:g}" if settings.lr else "", placeholderText="recipe default",
                                 toolTip="Peak learning rate, e.g. 1e-4")
        advanced.addRow("Learning rate", self.lr_edit)
        self.objects_spin = QSpinBox(minimum=0, maximum=256, value=settings.objects_per_batch, specialValueText="recipe default",
                                     toolTip="Objects per image in each training step")
        advanced.addRow("Objects per step", self.objects_spin)
        self.advanced_button.toggled.connect(self.advanced_box.setVisible)
        self.advanced_button.toggled.connect(lambda on: self.advanced_button.setArrowType(
            Qt.ArrowType.DownArrow if on else Qt.ArrowType.RightArrow))
        form.addRow(self.advanced_button)
        form.addRow(self.advanced_box)
        self.load_when_done = QCheckBox("Load the new model into the annotator when done", checked=settings.load_when_done)
        form.addRow(self.load_when_done)
        layout.addWidget(training_box)


    def token(self) -> str | None:
        """The token typed in, or None (then the environment's or the token file's is used)."""
        return self.token_edit.text().strip() or None

    def settings(self) -> FinetuneSettings:
        """The fields as settings (raises FinetuneError for a value that is not a number)."""
        try:
            lr = float(self.lr_edit.text()) if self.lr_edit.text().strip() else 0.0
        except ValueError:
            raise FinetuneError(f"the learning rate '{self.lr_edit.text()}' is not a number (e.g. 1e-4)") from None
        return FinetuneSettings(
            address=self.address_edit.text().strip(), storage=self.storage_edit.text().strip(),
            dataset=self.dataset_edit.text().strip(), base_model=self.model_edit.text().strip(),
            mode=self.mode_combo.currentText(), epochs=self.epochs_spin.value(), minutes=self.minutes_spin.value(),
            workers=self.workers_spin.value(), gpus_per_worker=self.gpu_spin.value(), lr=lr,
            objects_per_batch=self.objects_spin.value(), load_when_done=self.load_when_done.isChecked(),
        )
