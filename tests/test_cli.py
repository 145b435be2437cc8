"""The ``napari-raysam`` command line, run as a user would (in-process ``main``)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import tifffile

from backend.dataset import open_dataset
from backend.models import load_model
from napari_raysam.cli import main
from synthetic import synthetic_cells


def write_pairs(folder, n, channels=4):
    rng = np.random.default_rng(3)
    images, labels = [], []
    for i in range(n):
        image, label = synthetic_cells(rng, shape=(96, 96), n_channels=channels, n_cells=5)
        images.append(folder / f"img{i}.tif")
        labels.append(folder / f"lab{i}.tif")
        tifffile.imwrite(images[-1], image)
        tifffile.imwrite(labels[-1], label)
    return images, labels


def test_help_answers_without_loading_pytorch():
    # scripts and cluster admins call the command line often: its help took 4.9 s here, mostly PyTorch
    check = ("import sys\nfrom napari_raysam.cli import build_parser\nbuild_parser().format_help()\n"
             "print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "False", done.stderr[-2000:]


def test_export_then_append_hpa_style_images(tmp_path, capsys):
    images, labels = write_pairs(tmp_path, 3)
    data = tmp_path / "hpa.zarr"
    args = ["export", *map(str, images[:2]), "--labels", *map(str, labels[:2]), "-o", str(data),
            "--channel-names", "microtubules,protein,nucleus,er", "--sam-channels", "0,3,2"]
    assert main(args) == 0
    assert main(["export", str(images[2]), "--labels", str(labels[2]), "-o", str(data), "--split", "val"]) == 0
    assert "added 1 images" in capsys.readouterr().out
    dataset = open_dataset(data)
    assert dataset.channel_names == ["microtubules", "protein", "nucleus", "er"]
    assert dataset.sam_channels == [0, 3, 2]
    assert len(dataset.sample_ids()) == 3 and dataset.sample_ids("val")


def test_train_without_ray_then_evaluate_the_result(tmp_path, cell_dataset, capsys):
    storage = tmp_path / "runs"
    code = main([
        "train", "--data", str(cell_dataset), "--storage", str(storage), "--model", "random:tiny",
        "--epochs", "1", "--objects-per-batch", "2", "--rounds", "2", "--patch-size", "96", "--run-name", "cli-run",
        "--no-ray",
    ])
    assert code == 0
    assert json.loads((storage / "cli-run" / "config.json").read_text())["n_sub_iteration"] == 2
    model = storage / "cli-run" / "model"
    assert load_model(model).meta["mode"] == "decoder"
    capsys.readouterr()
    assert main(["evaluate", "--model", str(model), "--data", str(cell_dataset), "--no-automatic"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["split"] == "val" and result["n_objects"] > 0 and 0 <= result["box_iou"] <= 1
    assert result["msa"] is None


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--data", "{tmp}/missing.zarr", "--storage", "{tmp}"], "missing.zarr"),
        (["evaluate", "--model", "vit_q_lm", "--data", "{data}"], "not a file, a folder or a micro-sam model"),
        (["train", "--data", "{data}", "--storage", "{tmp}", "--address", "127.0.0.1:9"], "cannot reach a Ray"),
        (["train", "--data", "{data}", "--storage", "{tmp}", "--mode", "lora", "--model", "random:vit_t"], "LoRA"),
    ],
)
def test_bad_input_is_one_plain_line_and_exit_code_2(args, message, tmp_path, cell_dataset, capsys):
    args = [a.format(tmp=tmp_path, data=cell_dataset) for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err
