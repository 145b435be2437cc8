"""The annotator dock's "Model" and "Export" boxes: what to load and where, where to export.

Each box holds its inputs and says what the user asked for by a signal; the dock does the work
(:mod:`napari_raysam.widgets.annotator`).
"""

from __future__ import annotations

from pathlib import Path

from qtpy.QtCore import Signal
from qtpy.QtWidgets import QFileDialog, QFormLayout, QGroupBox, QHBoxLayout, QLabel, QLineEdit, QPushButton

from napari_raysam.annotator.devices import available_devices
from napari_raysam.annotator.model_sources import model_choices, resolve_model_source
from napari_raysam.widgets.annotator_image import compact_combo


class ModelPanel(QGroupBox):
    """Which model to load (a zoo name, a file, a model or run folder) and on which device."""

    load_requested = Signal()
    """Load was pressed, or a model file or folder was chosen."""
    device_chosen = Signal(str)

    def __init__(self) -> None:
        super().__init__("Model")
        form = QFormLayout(self)
        self.combo = compact_combo("A micro-sam model name, a model file or folder, or a fine-tuning run folder")
        self.combo.setEditable(True)
        self.combo.addItems(model_choices())
        browse_file = QPushButton("File…", toolTip="Choose a checkpoint file (.pt, .pth, .safetensors)")
        browse_file.clicked.connect(lambda: self._browse(folder=False))
        browse_folder = QPushButton("Folder…", toolTip="Choose a model folder or a fine-tuning run folder")
        browse_folder.clicked.connect(lambda: self._browse(folder=True))
        row = QHBoxLayout()
        row.addWidget(self.combo, stretch=1)
        row.addWidget(browse_file)
        row.addWidget(browse_folder)
        form.addRow("Model", row)
        self.device_combo = compact_combo("Where SAM runs: a GPU is many times faster than the CPU. Changing it reloads the model")
        self.device_combo.addItems(available_devices())  # the fastest first
        self.device_combo.currentTextChanged.connect(self.device_chosen)
        form.addRow("Device", self.device_combo)
        self.load_button = QPushButton("Load model", toolTip="Load the chosen model; embeddings are kept when its image encoder is unchanged")
        self.load_button.clicked.connect(self.load_requested)
        self.label = QLabel("no model loaded", wordWrap=True)
        form.addRow(self.load_button, self.label)

    def source(self) -> str:
        """The chosen model as a source ``load_model`` takes ('' when none is typed)."""
        return resolve_model_source(self.combo.currentText())

    def set_busy(self, busy: bool) -> None:
        self.load_button.setEnabled(not busy)
        self.device_combo.setEnabled(not busy and self.device_combo.count() > 1)

    def show_loaded(self, model_type: str, source: str, device: str, automatic_method: str) -> None:
        """Say which model is loaded, from where (a path's last two parts; all of it in the tooltip)."""
        shown = "/".join(Path(source).parts[-2:]) if Path(source).exists() else source
        self.label.setText(f"{model_type} from {shown} on {device}; automatic segmentation: {automatic_method}")
        self.label.setToolTip(source)

    def _browse(self, folder: bool) -> None:
        if folder:
            path = QFileDialog.getExistingDirectory(self, "Model folder or fine-tuning run folder")
        else:
            path, _ = QFileDialog.getOpenFileName(self, "SAM checkpoint", filter="Checkpoints (*.pt *.pth *.safetensors)")
        if path:
            self.combo.setCurrentText(path)
            self.load_requested.emit()


class ExportPanel(QGroupBox):
    """The dataset folder to export to and the split the images go to."""

    export_requested = Signal()

    def __init__(self) -> None:
        super().__init__("Export")
        form = QFormLayout(self)
        self.dataset_edit = QLineEdit(placeholderText="annotations.zarr", toolTip="Dataset folder (.zarr); created or appended to")
        browse = QPushButton("…", toolTip="Choose the dataset folder")
        browse.clicked.connect(self._browse)
        row = QHBoxLayout()
        row.addWidget(self.dataset_edit, stretch=1)
        row.addWidget(browse)
        form.addRow("Dataset", row)
        self.split_combo = compact_combo("Train images teach the model; val images measure it")
        self.split_combo.addItems(["train", "val"])
        form.addRow("Split", self.split_combo)
        self.button = QPushButton("Export", toolTip="Append the image and its committed objects to the dataset")
        self.button.clicked.connect(self.export_requested)
        form.addRow(self.button)

    def dataset(self) -> str:
        """The dataset path typed ('' when none)."""
        return self.dataset_edit.text().strip()

    def split(self) -> str:
        return self.split_combo.currentText()

    def _browse(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Dataset folder (.zarr)")
        if path:
            self.dataset_edit.setText(path)
