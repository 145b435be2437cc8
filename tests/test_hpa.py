"""HPA fields of view (four stain files) read as one image, alone and as a folder series; the npe2 reader in napari."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest

from napari_raysam.annotator.hpa import CHANNEL_NAMES, COLOURS, field_of_view, fields_in_folder, read_field, read_series
from napari_raysam.annotator.image_source import ImageChannels, ImageError
from synthetic import synthetic_cells


def write_field(folder: Path, name: str, seed: int, shape=(96, 96), skip: str | None = None) -> np.ndarray:
    """Four HPA-named uint8 PNGs of a synthetic field; returns its (4, H, W) truth."""
    image, _ = synthetic_cells(np.random.default_rng(seed), shape=shape, n_channels=4, n_cells=3)
    image = (255 * image / image.max()).astype(np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    for colour, plane in zip(COLOURS, image):
        if colour != skip:
            iio.imwrite(folder / f"{name}_{colour}.png", plane)
    return image


def test_asking_our_reader_about_a_file_does_not_load_pytorch():
    # napari asks our reader (pattern "*") about every file a user opens, on its own thread: loading
    # PyTorch there froze napari ~2 s at the first file opened, ours or not
    check = "import sys, napari_raysam.reader; print(sorted({'torch', 'ray'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr[-2000:]


def test_any_one_file_opens_its_field_in_hpa_order_with_the_hpa_sam_mapping(tmp_path):
    truth = write_field(tmp_path, "1234_A1_1", seed=0)
    write_field(tmp_path, "1234_A1_2", seed=1)  # a neighbour in the same folder is not mixed in
    for colour in COLOURS:
        field = field_of_view(tmp_path / f"1234_A1_1_{colour}.png")
        np.testing.assert_array_equal(read_field(field), truth)
    channels = ImageChannels.from_layer(read_field(field), rgb=False, channel_axis=0, name="field")
    # microtubules, ER, nucleus feed SAM's red, green, blue
    assert [CHANNEL_NAMES[i] for i in channels.default_sam_channels()] == ["microtubules", "ER", "nucleus"]


def test_a_colour_rendered_stain_file_is_read_as_its_stain(tmp_path):
    truth = write_field(tmp_path, "f", seed=2)
    rendered = np.zeros((*truth.shape[1:], 3), np.uint8)
    rendered[..., 1] = truth[1]  # HPA's jpgs show the protein in green
    iio.imwrite(tmp_path / "f_green.png", rendered)
    np.testing.assert_array_equal(read_field(field_of_view(tmp_path / "f_red.png"))[1], truth[1])


def test_a_missing_stain_file_is_named_with_what_to_do(tmp_path):
    write_field(tmp_path, "f", seed=0, skip="yellow")
    with pytest.raises(ImageError, match=r"no yellow \(ER\) file.*f_yellow"):
        field_of_view(tmp_path / "f_red.png")
    with pytest.raises(ImageError, match="no yellow"):
        fields_in_folder(tmp_path)


def test_a_folder_is_a_lazy_series_that_reads_a_field_when_it_is_shown(tmp_path, monkeypatch):
    truths = [write_field(tmp_path, f"field_{k}", seed=k) for k in range(3)]
    fields = fields_in_folder(tmp_path)
    assert [field.name for field in fields] == ["field_0", "field_1", "field_2"]
    import napari_raysam.annotator.hpa as hpa

    reads = []
    real = hpa.read_field
    monkeypatch.setattr(hpa, "read_field", lambda field: reads.append(field.name) or real(field))
    series = read_series(fields)
    assert series.shape == (4, 3, 96, 96)
    assert reads == ["field_0"]  # only the first, for the size
    np.testing.assert_array_equal(np.asarray(series[:, 2]), truths[2])
    assert reads == ["field_0", "field_2"]


def test_a_folder_field_of_another_size_says_how_to_open_it(tmp_path):
    write_field(tmp_path, "a", seed=0)
    write_field(tmp_path, "b", seed=1, shape=(128, 96))
    series = read_series(fields_in_folder(tmp_path))
    with pytest.raises(ImageError, match="'b' is.*open this field by one of its files"):
        np.asarray(series[:, 1])


@pytest.mark.parametrize("opened", ["file", "folder"])
def test_napari_opens_hpa_files_through_our_reader_and_the_annotator_takes_the_four_stains(
    make_napari_viewer, tmp_path, opened,
):
    from napari_raysam.widgets.annotator import AnnotatorWidget

    truths = [write_field(tmp_path / "plate", f"well_{k}", seed=k) for k in range(2)]
    viewer = make_napari_viewer()
    widget = AnnotatorWidget(viewer, cache_dir=tmp_path / "cache")
    path = tmp_path / "plate" / "well_1_blue.png" if opened == "file" else tmp_path / "plate"
    viewer.open(str(path), plugin="napari-raysam")
    from napari.layers import Image

    stains = [layer for layer in viewer.layers if isinstance(layer, Image)]  # the dock adds its own layers
    assert [layer.name.split(" (")[0] for layer in stains] == list(CHANNEL_NAMES)
    assert [layer.colormap.name for layer in stains] == list(COLOURS)
    # the prompts and masks stay above the stains that arrived after them
    assert all(isinstance(layer, Image) for layer in list(viewer.layers)[:4])
    # the dock chose the four stain layers as one image, mapped to SAM as HPA's segmentation does
    channels = widget.image.read_channels()
    assert [name.split(" (")[0] for name in channels.names] == list(CHANNEL_NAMES)
    assert channels.default_sam_channels() == (0, 3, 2)
    if opened == "file":
        np.testing.assert_array_equal(channels.plane(()), truths[1])
    else:
        assert channels.stack_shape == (2,)
        np.testing.assert_array_equal(channels.plane((1,)), truths[1])
