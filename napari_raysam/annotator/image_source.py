"""What is annotated: napari image layers as named 2D channels, one slice at a time, and SAM's input.

An image is a set of channels of identical shape ``(stack..., H, W)``: ``stack`` is ``()`` for
a 2D image or ``(Z,)`` for a stack annotated slice by slice. Channels may be lazy (dask, zarr):
only the slice asked for by :meth:`ImageChannels.plane` is read.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from backend.dataset import DatasetError, content_sha256, non_finite_count, to_sam_rgb

MIN_SIZE = 64  # smallest height and width SAM is asked to segment

_RGB_NAMES = ("red", "green", "blue")
# HPA images are (microtubules, protein, nucleus, ER): cells are delineated by microtubules and
# ER, nuclei by the nucleus stain, as in HPA's cell segmentation; the protein channel changes
# with every antibody, so it is left out of SAM's input.
_HPA_SAM_CHANNELS = (0, 3, 2)


class ImageError(ValueError):
    """An image cannot be annotated; the message says what to do."""


def _read(part: Any) -> np.ndarray:
    """``part`` (numpy, zarr, a dask array, a ``_ChannelView``) read into memory.

    A dask array is computed in the calling thread with no callbacks: without them dask swaps its
    global callback set in and out, which breaks napari's dask cache when napari reads the same
    array on the event loop while a worker reads a plane (KeyError in the cache).
    """
    if hasattr(part, "compute"):
        part = part.compute(scheduler="sync", callbacks=[])
    return np.asarray(part)


class _ChannelView:
    """One channel of a lazy array (dask, zarr, ...): indexing reads only what is asked for.

    ``array[..., channel, ...]`` on a zarr array would read every slice at once; this view
    inserts the channel index only when a slice is requested.
    """

    def __init__(self, array: Any, axis: int, channel: int) -> None:
        self._array = array
        self._axis = axis
        self._channel = channel
        self.shape = tuple(array.shape[:axis]) + tuple(array.shape[axis + 1:])
        self.dtype = np.dtype(array.dtype)
        self.ndim = len(self.shape)

    def __getitem__(self, index: tuple[int, ...]) -> np.ndarray:
        index = index if isinstance(index, tuple) else (index,)
        full = [slice(None)] * self.ndim
        full[: len(index)] = index
        full.insert(self._axis, self._channel)
        return _read(self._array[tuple(full)])

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return np.asarray(self[()], dtype=dtype)


def _channel(array: Any, axis: int, channel: int) -> Any:
    """Channel ``channel`` along ``axis``: a view of a numpy array, else a lazy :class:`_ChannelView`."""
    if isinstance(array, np.ndarray):
        return array[(slice(None),) * axis + (channel,)]
    return _ChannelView(array, axis, channel)


def _check_dtype(dtype: np.dtype, name: str) -> None:
    if not (dtype == bool or np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)):
        raise ImageError(
            f"layer '{name}' has pixel type {dtype}; napari-raysam annotates integer, boolean or "
            f"floating point intensities: convert it, e.g. image.astype(np.float32)"
        )


def _check_spatial_ndim(shape: tuple[int, ...], name: str, what: str) -> None:
    """Refuse anything but ``(H, W)`` or ``(Z, H, W)``; ``what`` says which axes were taken out."""
    if len(shape) not in (2, 3):
        raise ImageError(
            f"layer '{name}' is {len(shape)}D{what} (shape {shape}): napari-raysam annotates 2D "
            f"images and stacks of 2D slices (Z, H, W). For a time-lapse of z-stacks, open one "
            f"time point as its own layer"
        )


@dataclass(frozen=True)
class ImageChannels:
    """An image to annotate: named channels of identical shape ``(stack..., H, W)``.

    Attributes:
        channels: per channel a ``(H, W)`` or ``(Z, H, W)`` array (numpy, or lazy: dask, zarr),
            all of the same shape; any integer, bool or float dtype.
        names: one name per channel.
    """

    channels: tuple[np.ndarray, ...]
    names: tuple[str, ...]

    @classmethod
    def from_layer(cls, data: Any, *, rgb: bool, channel_axis: int | None, name: str) -> ImageChannels:
        """The channels of one napari image layer's ``data``.

        Args:
            data: the layer's array.
            rgb: the layer is RGB(A): ``(..., H, W, 3 | 4)``; channels R, G, B (alpha dropped),
                named ``"red"``, ``"green"``, ``"blue"``.
            channel_axis: an axis of ``data`` holding channels, named ``"channel 0"``, ...
                (short, so the channel choosers stay readable); None: a single channel named ``name``.
            name: the layer's name.

        Raises:
            ImageError: for both ``rgb`` and ``channel_axis``, a bad axis, a pixel type other than
                integer, bool or float, or if what is left is not 2D or 3D (one stack axis).
        """
        _check_dtype(np.dtype(data.dtype), name)
        shape = tuple(data.shape)
        if rgb and channel_axis is not None:
            raise ImageError(
                f"layer '{name}' is RGB, so its channels are already known; do not give a channel axis"
            )
        if rgb:
            if len(shape) < 3 or shape[-1] not in (3, 4):
                raise ImageError(
                    f"layer '{name}' is marked RGB but its last axis has {shape[-1] if shape else 0} "
                    f"entries (shape {shape}); RGB(A) images end in 3 or 4 colour values"
                )
            _check_spatial_ndim(shape[:-1], name, " without its colour axis")
            axis = len(shape) - 1
            return cls(
                tuple(_channel(data, axis, k) for k in range(3)),
                _RGB_NAMES,
            )
        if channel_axis is not None:
            if not -len(shape) <= channel_axis < len(shape):
                raise ImageError(
                    f"layer '{name}' has {len(shape)} axes (shape {shape}); channel axis "
                    f"{channel_axis} does not exist: choose one between 0 and {len(shape) - 1}"
                )
            axis = channel_axis % len(shape)
            rest = shape[:axis] + shape[axis + 1:]
            _check_spatial_ndim(rest, name, f" without its channel axis {axis}")
            return cls(
                tuple(_channel(data, axis, k) for k in range(shape[axis])),
                tuple(f"channel {k}" for k in range(shape[axis])),
            )
        _check_spatial_ndim(shape, name, "")
        return cls((data,), (name,))

    @classmethod
    def from_layers(cls, datas: Sequence[Any], names: Sequence[str]) -> ImageChannels:
        """Separate single-channel layers as the channels of one image (e.g. HPA's four stains).

        Args:
            datas: per layer a ``(H, W)`` or ``(Z, H, W)`` array; all of the same shape.
            names: per layer its name, used as the channel name.

        Raises:
            ImageError: for no layers, a pixel type other than integer, bool or float, a layer
                that is not 2D or 3D, or layers of different shapes.
        """
        if not datas:
            raise ImageError("choose at least one image layer to annotate")
        if len(datas) != len(names):
            raise ValueError(f"got {len(datas)} layers but {len(names)} names; pass one name per layer")
        for data, name in zip(datas, names):
            _check_dtype(np.dtype(data.dtype), name)
            _check_spatial_ndim(tuple(data.shape), name, "")
        first_shape = tuple(datas[0].shape)
        for data, name in zip(datas[1:], names[1:]):
            if tuple(data.shape) != first_shape:
                raise ImageError(
                    f"layer '{name}' has shape {tuple(data.shape)} but layer '{names[0]}' has "
                    f"shape {first_shape}: channels of one image must have the same shape; choose "
                    f"layers showing the same field of view"
                )
        return cls(tuple(datas), tuple(names))

    @property
    def stack_shape(self) -> tuple[int, ...]:
        """``()`` for a 2D image, ``(Z,)`` for a stack of slices."""
        return tuple(self.channels[0].shape[:-2])

    @property
    def shape(self) -> tuple[int, int]:
        """``(H, W)`` of every slice."""
        height, width = self.channels[0].shape[-2:]
        return int(height), int(width)

    def plane(self, index: tuple[int, ...] = ()) -> np.ndarray:
        """The raw ``(C, H, W)`` intensities of one slice, in the original dtype.

        Args:
            index: the slice: ``()`` for a 2D image, ``(z,)`` for a stack.

        Raises:
            ImageError: if ``index`` does not name a slice of this image.
        """
        index = tuple(int(i) for i in index)
        stack = self.stack_shape
        if len(index) != len(stack) or not all(0 <= i < n for i, n in zip(index, stack)):
            where = f"slices 0 to {stack[0] - 1}" if stack else "a 2D image: use index ()"
            raise ImageError(f"slice {index} does not exist in this image ({where})")
        return np.stack([_read(channel[index]) for channel in self.channels])

    def default_sam_channels(self) -> tuple[int, ...]:
        """The channels fed to SAM's RGB input unless the user chooses others.

        1 or 2 channels: the first (a second stain is usually a marker SAM cannot use as
        colour); 3 channels (e.g. RGB): all three in order; 4 channels: HPA's order
        (microtubules, protein, nucleus, ER), so microtubules, ER and nucleus as R, G, B, the
        stains that outline cells (HPA's and micro-sam's practice); more: the first three.
        """
        n_channels = len(self.channels)
        if n_channels < 3:
            return (0,)
        if n_channels == 4:
            return _HPA_SAM_CHANNELS
        return (0, 1, 2)


def check_plane(plane: np.ndarray, where: str) -> None:
    """Check that SAM can segment a ``(C, H, W)`` or ``(H, W)`` slice.

    Args:
        plane: the raw intensities.
        where: what the slice is (e.g. the layer name), for the message.

    Raises:
        ImageError: for NaN or infinite pixels, or a height or width below ``MIN_SIZE``.
    """
    height, width = plane.shape[-2:]
    if height < MIN_SIZE or width < MIN_SIZE:
        raise ImageError(
            f"{where}: SAM needs at least {MIN_SIZE} x {MIN_SIZE} pixels; this image is "
            f"{height} x {width} (height x width). Annotate a larger image, or enlarge this one "
            f"(e.g. skimage.transform.rescale) before annotating"
        )
    n_bad = non_finite_count(plane)
    if n_bad:
        raise ImageError(
            f"{where}: {n_bad} pixels are NaN or infinite; replace them, e.g. with "
            f"np.nan_to_num(image), and add the image again"
        )


def sam_rgb(plane: np.ndarray, sam_channels: Sequence[int]) -> np.ndarray:
    """SAM's input for one slice: ``(H, W, 3)`` uint8, as ``segment_anything``'s ``set_image`` takes it.

    Each chosen channel is scaled by its own intensity percentiles
    (``backend.dataset.to_sam_rgb``, the same scaling as training); one channel is repeated
    three times.

    Args:
        plane: ``(C, H, W)`` or ``(H, W)`` raw intensities (from :meth:`ImageChannels.plane`).
        sam_channels: 1 or 3 channel indices, in RGB order.

    Raises:
        ImageError: if ``sam_channels`` are not 1 or 3 valid channel indices.
    """
    plane = np.asarray(plane)
    if plane.ndim == 2:
        plane = plane[None]
    if plane.dtype == bool:  # percentiles need arithmetic, which numpy refuses on booleans
        plane = plane.view(np.uint8)
    try:
        rgb = to_sam_rgb(plane, sam_channels)
    except DatasetError as error:
        raise ImageError(
            f"SAM channels {list(sam_channels)} do not fit this image: choose 1 or 3 channel "
            f"indices between 0 and {plane.shape[0] - 1} (it has {plane.shape[0]} channels)"
        ) from error
    rgb = np.ascontiguousarray(np.rint(np.moveaxis(rgb, 0, -1)).astype(np.uint8))
    rgb.flags.writeable = False  # read-only, so content_key hashes it once however often it is asked
    return rgb


_KEYS_LOCK = threading.RLock()  # reentrant: forget() may run from a garbage collection inside a locked block
_KEYS: dict[int, tuple[weakref.ref, str]] = {}  # content_key of live read-only arrays, by id


def content_key(array: np.ndarray) -> str:
    """sha256 hex digest of an array's dtype, shape and C-order bytes.

    Keys the caches: autosaved labels by the raw ``(C, H, W)`` slice (so they survive a change
    of SAM channels), embeddings by SAM's input. For a raw slice it equals the ``image_sha256``
    a dataset export records for that image.

    A read-only array that owns its data (what :func:`sam_rgb` returns) cannot change, so its key
    is computed once and remembered while the array lives: the SAM session asks for the key of
    one input several times (cache lookup, embeddings, uncertainty), a second each for a
    10,000 x 10,000 image.
    """
    array = np.asarray(array)
    if array.flags.writeable or not array.flags.owndata:
        return content_sha256(array)
    with _KEYS_LOCK:
        known = _KEYS.get(id(array))
    if known is not None and known[0]() is array:
        return known[1]
    key = content_sha256(array)

    def forget(ref: weakref.ref, address: int = id(array)) -> None:
        with _KEYS_LOCK:
            if _KEYS.get(address, (None,))[0] is ref:
                del _KEYS[address]

    with _KEYS_LOCK:
        _KEYS[id(array)] = (weakref.ref(array, forget), key)
    return key


def first_axis_is_channels(shape: tuple[int, ...], rgb: bool) -> bool:
    """Guess for a non-RGB 3D/4D layer: a short first axis (4 or fewer entries, e.g. HPA's 4 stains)
    is far more often channels than slices."""
    return not rgb and len(shape) >= 3 and shape[0] <= 4


def last_axis_is_channels(shape: tuple[int, ...], rgb: bool) -> bool:
    """Guess for a non-RGB 3D layer: ``(H, W, C)`` with a short last axis (8 or fewer entries) and
    a first axis too long to be channels. napari shows such an array as a stack of ``H`` slices of
    ``(W, C)``: it has to be split into one layer per channel to be seen, and annotated, as an image."""
    return not rgb and len(shape) == 3 and shape[-1] <= 8 and not first_axis_is_channels(shape, rgb)


def sam_channels_choice(red: int, green: int | None, blue: int | None) -> tuple[int, ...]:
    """The SAM channels for a choice of one channel per colour: ``(red,)`` when green and blue are
    both None (one channel fed to all three colours), else ``(red, green, blue)``.

    Raises:
        ImageError: only one of green and blue is chosen.
    """
    if green is None and blue is None:
        return (red,)
    if green is None or blue is None:
        raise ImageError("choose a channel for both green and blue, or none (—) for both to use the red channel alone")
    return (red, green, blue)


def stack_index(channels: ImageChannels, data_point: Sequence[float], channel_axis: int | None) -> tuple[int, ...]:
    """The slice of ``channels`` at the layer's data coordinates ``data_point`` (``()`` for a 2D image).

    Args:
        data_point: the viewer's point in the layer's data coordinates, one entry per layer axis.
        channel_axis: the layer axis that holds channels (dropped from ``data_point``), or None.
    """
    if not channels.stack_shape:
        return ()
    point = np.asarray(data_point, dtype=float)
    if channel_axis is not None:
        point = np.delete(point, channel_axis)
    return (int(np.clip(np.round(point[-3]), 0, channels.stack_shape[0] - 1)),)
