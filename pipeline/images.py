"""The two ends of the [-1, 1] range: uint8 pixels to model tensors and back; image grids.

from_uint8 and to_uint8 are exact inverses on all 256 levels (tests/test_models_losses.py):
the samples G is scored on are quantised exactly as the training images were."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def from_uint8(pixels: torch.Tensor, dtype: torch.dtype = torch.float32, channels_last: bool = False) -> torch.Tensor:
    """N x H x W x C uint8 -> N x C x H x W `dtype` in [-1, 1] (0 -> -1, 255 -> 1), on the
    pixels' own device: the trainer calls it after the uint8 batch reached the GPU, so a
    quarter of the float32 bytes crosses the bus and the GPU does the arithmetic.

    Scaled in float32, then rounded to dtype once. The permuted NHWC tensor already has
    channels_last strides, so channels_last costs no copy; the default NCHW layout is one."""
    images = pixels.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    return images.to(dtype=dtype, memory_format=layout)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """N x C x H x W in [-1, 1] -> N x H x W x C uint8, rounded as a saved image is."""
    return images.detach().float().add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()


def save_grid(images: torch.Tensor, path: str | Path, columns: int | None = None, padding: int = 2) -> Path:
    pixels = to_uint8(images).numpy()
    n, h, w, c = pixels.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    grid = np.zeros((rows * (h + padding) + padding, columns * (w + padding) + padding, c), np.uint8)
    for i in range(n):
        top, left = padding + (i // columns) * (h + padding), padding + (i % columns) * (w + padding)
        grid[top : top + h, left : left + w] = pixels[i]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid[:, :, 0] if c == 1 else grid).save(path)
    return path
