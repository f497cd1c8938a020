"""Decoding untrusted image bytes: the one place where any failure of the image decoder
becomes `BadSample`, which the callers count and skip (loader, FID) or reject (prepare).

Callers catch `BadSample` alone, so a bug in our own code still raises with its traceback.
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path

import numpy as np
from PIL import Image

# Image types we read, as file suffixes (without the dot) and as WebDataset member names.
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp", "bmp")
# `prepare --format raw`: the image's uncompressed uint8 H x W x C bytes, no header. Read
# without Pillow (a memory view and a reshape), for loaders that must feed GPUs.
RAW_EXTENSION = "raw"


class BadSample(ValueError):
    """A sample that cannot be used: it does not decode, has the wrong shape or label, or is
    missing from a truncated shard."""


def is_image_name(name: str | Path) -> bool:
    return os.path.splitext(name)[1].lower().removeprefix(".") in IMAGE_EXTENSIONS


def open_image(source: bytes | str | Path) -> Image.Image:
    """Pillow's image, fully decoded now (a truncated file fails here, not later)."""
    try:
        image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
        image.load()
    except Exception as exc:
        # Pillow's decoders raise many unrelated types on malformed input (OSError, SyntaxError,
        # ValueError, struct.error, IndexError, DecompressionBombError, ...; see Pillow's
        # Tests/oss-fuzz): these bytes are untrusted, so every failure here is a bad sample.
        raise BadSample(f"does not decode ({type(exc).__name__}: {exc})") from exc
    return image


def square_shape(size: int) -> tuple[int, int, int]:
    """The H x W x C of a square raw image from its byte count: side*side (grayscale) or
    side*side*3 (RGB). Never both, as 3 is not a square; used when no manifest gives the shape."""
    for channels in (1, 3):
        side = math.isqrt(size // channels)
        if side > 0 and side * side * channels == size:
            return side, side, channels
    raise BadSample(f"raw image of {size} bytes is not a square grayscale or RGB uint8 image")


def decode_raw(data: bytes | np.ndarray, shape: tuple[int, int, int] | None) -> np.ndarray:
    """A read-only uint8 H x W x C view of a raw member's bytes (or of a 1-D uint8 array: a
    slice of a mapped shard, viewed without a copy)."""
    shape = shape or square_shape(len(data))
    if len(data) != math.prod(shape):
        raise BadSample(f"raw image holds {len(data)} bytes; the dataset's {shape} uint8 needs {math.prod(shape)}")
    array = data if isinstance(data, np.ndarray) else np.frombuffer(data, np.uint8)
    return array.reshape(shape)


def class_label(data: bytes) -> int:
    """A `.cls` member's class: ASCII digits, as `prepare` and WebDataset write it."""
    try:
        return int(data)
    except ValueError:
        raise BadSample(f"class {data[:20]!r} is not an integer") from None


def decode_sample(files: dict, shape: tuple[int, int, int] | None) -> tuple[np.ndarray, int | None]:
    """(uint8 H x W x C image, class or None) from a WebDataset sample's members."""
    if RAW_EXTENSION in files:
        array = decode_raw(files[RAW_EXTENSION], shape)
    else:
        ext = next((e for e in IMAGE_EXTENSIONS if e in files), None)
        if ext is None:
            raise BadSample(f"no image member (has: {', '.join(files) or 'nothing'})")
        array = np.asarray(open_image(files[ext]), dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    if shape is not None and array.shape != shape:
        raise BadSample(f"decoded shape {array.shape} differs from the dataset's {shape}")
    return array, class_label(files["cls"]) if "cls" in files else None
