"""Raw intensities to SAM's input, as training and the annotator both scale them."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from backend.dataset.samples import DatasetError, _check_sam_channels


_PERCENTILES = (1.0, 99.8)  # lower/upper intensity percentiles, as micro-sam's normalisation


def to_sam_rgb(image: np.ndarray, sam_channels: Sequence[int]) -> np.ndarray:
    """Turn raw intensities into SAM's input: ``(3, H, W)`` float32 in [0, 255].

    Each selected channel is scaled so its 1st..99.8th percentile maps to [0, 255]
    (clipped), like micro-sam's percentile normalisation; SAM itself normalises this
    0..255 input. One selected channel is repeated three times. A constant channel gives
    zeros; if the percentiles coincide, the channel's min..max is used instead.

    Args:
        image: ``(C, H, W)`` (or ``(H, W)``, as C = 1) raw intensities, any real dtype.
        sam_channels: 1 or 3 channel indices, in RGB order.
    """
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[None]
    if image.ndim != 3:
        raise DatasetError(f"image must have shape (C, H, W) or (H, W); got {image.shape}")
    _check_sam_channels(list(sam_channels), image.shape[0], "to_sam_rgb")
    channels = image[list(sam_channels)]
    return _scale_to_sam(channels, [_intensity_range(channel) for channel in channels])


def _intensity_range(channel: np.ndarray) -> tuple[float, float]:
    """``(low, high)`` of one ``(H, W)`` channel used to scale it to SAM's input range."""
    low, high = np.percentile(channel, _PERCENTILES)
    if high <= low:
        low, high = channel.min(), channel.max()
    return float(low), float(high)


def _scale_to_sam(
    channels: np.ndarray, ranges: Sequence[tuple[float, float]]
) -> np.ndarray:
    """``(1 | 3, H, W)`` raw channels and their ``(low, high)`` -> ``(3, H, W)`` float32 0..255."""
    scaled = np.zeros(channels.shape, np.float32)
    for k, (low, high) in enumerate(ranges):
        if high > low:
            scaled[k] = np.clip(
                (channels[k].astype(np.float32) - np.float32(low)) / np.float32(high - low), 0, 1
            ) * np.float32(255)
    return np.repeat(scaled, 3, axis=0) if len(scaled) == 1 else scaled
