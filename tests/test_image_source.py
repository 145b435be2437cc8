"""Images to annotate (napari_raysam.annotator.image_source): channels of napari layers, slices, SAM input."""

import numpy as np
import pytest

from napari_raysam.annotator.image_source import (
    MIN_SIZE,
    ImageChannels,
    ImageError,
    check_plane,
    content_key,
    first_axis_is_channels,
    last_axis_is_channels,
    sam_rgb,
)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


class _RecordingArray:
    """A zarr-like array that records which regions are read (zarr reads eagerly on indexing)."""

    def __init__(self, data: np.ndarray) -> None:
        self._data = data
        self.shape, self.dtype = data.shape, data.dtype
        self.reads: list[tuple] = []

    def __getitem__(self, key):
        self.reads.append(key)
        return self._data[key]


# --- channels of layers --------------------------------------------------------------------------


def test_grayscale_layer_is_one_channel_with_the_original_dtype(rng):
    data = rng.integers(0, 4000, (100, 120), dtype=np.uint16)
    image = ImageChannels.from_layer(data, rgb=False, channel_axis=None, name="cells")
    assert image.names == ("cells",)
    assert image.stack_shape == () and image.shape == (100, 120)
    plane = image.plane()
    assert plane.shape == (1, 100, 120) and plane.dtype == np.uint16
    np.testing.assert_array_equal(plane[0], data)
    assert image.default_sam_channels() == (0,)


def test_rgba_layer_gives_red_green_blue_and_drops_alpha(rng):
    data = rng.integers(0, 256, (100, 120, 4), dtype=np.uint8)
    image = ImageChannels.from_layer(data, rgb=True, channel_axis=None, name="he")
    assert image.names == ("red", "green", "blue")
    np.testing.assert_array_equal(image.plane(), np.moveaxis(data[..., :3], -1, 0))
    assert image.default_sam_channels() == (0, 1, 2)


def test_channel_axis_splits_channels_and_hpa_order_feeds_sam(rng):
    data = rng.random((100, 4, 120)).astype(np.float32)
    image = ImageChannels.from_layer(data, rgb=False, channel_axis=-2, name="hpa")
    assert image.names == ("channel 0", "channel 1", "channel 2", "channel 3")
    assert image.shape == (100, 120)
    np.testing.assert_array_equal(image.plane(), np.moveaxis(data, 1, 0))
    # HPA: microtubules, protein, nucleus, ER -> microtubules, ER, nucleus as RGB.
    assert image.default_sam_channels() == (0, 3, 2)


def test_separate_layers_become_channels_in_order(rng):
    layers = [rng.integers(0, 255, (80, 90), dtype=np.uint8) for _ in range(2)]
    image = ImageChannels.from_layers(layers, ["nucleus", "membrane"])
    assert image.names == ("nucleus", "membrane")
    np.testing.assert_array_equal(image.plane(), np.stack(layers))
    assert image.default_sam_channels() == (0,)


def test_a_stack_is_annotated_slice_by_slice(rng):
    data = rng.integers(0, 255, (5, 3, 70, 80), dtype=np.uint8)  # (Z, C, H, W)
    image = ImageChannels.from_layer(data, rgb=False, channel_axis=1, name="stack")
    assert image.stack_shape == (5,) and image.shape == (70, 80)
    np.testing.assert_array_equal(image.plane((2,)), data[2])
    with pytest.raises(ImageError, match="slices 0 to 4"):
        image.plane((5,))
    with pytest.raises(ImageError):
        image.plane()


def test_lazy_arrays_are_read_one_slice_at_a_time(rng):
    data = _RecordingArray(rng.integers(0, 255, (3, 6, 70, 80), dtype=np.uint8))  # (C, Z, H, W)
    image = ImageChannels.from_layer(data, rgb=False, channel_axis=0, name="zarr")
    assert data.reads == []
    plane = image.plane((4,))
    np.testing.assert_array_equal(plane, data._data[:, 4])
    assert sorted(key[:2] for key in data.reads) == [(0, 4), (1, 4), (2, 4)]


def test_four_dimensional_layer_is_refused_with_what_to_do():
    data = np.zeros((2, 3, 70, 80), np.uint8)
    with pytest.raises(ImageError, match=r"4D .*2D images and stacks of 2D slices.*time point"):
        ImageChannels.from_layer(data, rgb=False, channel_axis=None, name="timelapse")
    with pytest.raises(ImageError, match="4D without its colour axis"):
        ImageChannels.from_layer(
            np.zeros((2, 3, 70, 80, 3), np.uint8), rgb=True, channel_axis=None, name="rgb"
        )


def test_non_numeric_pixels_are_refused():
    with pytest.raises(ImageError, match="complex"):
        ImageChannels.from_layer(np.zeros((70, 80), np.complex64), rgb=False, channel_axis=None, name="fft")


def test_layers_of_different_shapes_are_refused_naming_both_shapes():
    with pytest.raises(ImageError, match=r"\(70, 81\).*\(70, 80\)"):
        ImageChannels.from_layers([np.zeros((70, 80)), np.zeros((70, 81))], ["a", "b"])


# --- checks and SAM input -------------------------------------------------------------------------


def test_check_plane_counts_nan_and_infinite_pixels():
    plane = np.zeros((2, 70, 80), np.float32)
    plane[0, 0, :2] = np.nan
    plane[1, 5, 5] = np.inf
    with pytest.raises(ImageError, match=r"3 pixels are NaN or infinite.*nan_to_num"):
        check_plane(plane, "layer 'x'")


def test_check_plane_refuses_images_smaller_than_sam_needs():
    with pytest.raises(ImageError, match=rf"at least {MIN_SIZE} x {MIN_SIZE}.*40 x 500"):
        check_plane(np.ones((1, 40, 500), np.uint8), "layer 'thin'")
    check_plane(np.zeros((MIN_SIZE, MIN_SIZE), np.uint16), "layer 'empty'")  # all zero is fine


def test_sam_rgb_is_uint8_rgb_of_the_chosen_channels(rng):
    plane = rng.integers(0, 4000, (4, 70, 80), dtype=np.uint16)
    rgb = sam_rgb(plane, (0, 3, 2))
    assert rgb.shape == (70, 80, 3) and rgb.dtype == np.uint8
    assert rgb.min() == 0 and rgb.max() == 255  # percentile-stretched
    # The brightest pixel of channel 3 is saturated in green.
    assert rgb[..., 1].flat[np.argmax(plane[3])] == 255
    single = sam_rgb(plane[1], (0,))
    np.testing.assert_array_equal(single[..., 0], single[..., 2])


def test_sam_rgb_accepts_boolean_masks():
    plane = np.zeros((70, 80), bool)
    plane[10:20, 10:20] = True
    rgb = sam_rgb(plane, (0,))
    assert rgb[15, 15, 0] == 255 and rgb[50, 50, 0] == 0


def test_sam_rgb_names_the_valid_channel_range():
    with pytest.raises(ImageError, match="between 0 and 3"):
        sam_rgb(np.zeros((4, 70, 80), np.uint8), (0, 4, 2))


def test_content_key_depends_on_values_dtype_and_shape_not_memory_layout(rng):
    plane = rng.integers(0, 255, (2, 70, 80), dtype=np.uint8)
    assert content_key(plane) == content_key(plane.copy())
    assert content_key(np.asfortranarray(plane)) == content_key(plane)
    assert content_key(plane) != content_key(plane.astype(np.uint16))
    assert content_key(plane) != content_key(plane.reshape(2, 80, 70))
    changed = plane.copy()
    changed[0, 0, 0] ^= 1
    assert content_key(changed) != content_key(plane)


def test_which_axis_holds_channels_is_guessed_from_the_shape():
    assert first_axis_is_channels((4, 512, 512), rgb=False) and not last_axis_is_channels((4, 512, 512), rgb=False)
    assert last_axis_is_channels((512, 600, 5), rgb=False) and last_axis_is_channels((512, 600, 2), rgb=False)
    assert not last_axis_is_channels((40, 512, 512), rgb=False)  # a stack of slices
    assert not last_axis_is_channels((512, 600, 3), rgb=True)  # RGB: napari shows it right
    assert not last_axis_is_channels((512, 600), rgb=False) and not last_axis_is_channels((3, 512, 600, 5), rgb=False)


def test_a_sam_input_is_hashed_once_however_often_its_key_is_asked(rng, monkeypatch):
    from napari_raysam.annotator import image_source

    hashed = []
    sha256 = image_source.content_sha256
    monkeypatch.setattr(image_source, "content_sha256", lambda array: hashed.append(array.shape) or sha256(array))
    rgb = sam_rgb(rng.integers(0, 4000, (3, 64, 80), dtype=np.uint16), (0, 1, 2))
    assert not rgb.flags.writeable  # nobody can change it behind the remembered key
    keys = {content_key(rgb) for _ in range(3)}
    assert len(keys) == 1 and hashed == [(64, 80, 3)]
    # an array that can change is hashed every time: its key follows its pixels
    plane = rng.integers(0, 255, (2, 30, 40), dtype=np.uint8)
    before = content_key(plane)
    plane[0, 0, 0] ^= 1
    assert content_key(plane) != before and len(hashed) == 3
