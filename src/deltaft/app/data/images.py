"""Decoding image files of any mode into RGB: EXIF orientation, transparency, 16-bit gray."""

from __future__ import annotations

import os
import stat

import numpy as np
from PIL import Image, ImageOps

__all__ = ["MAX_ASPECT_RATIO", "ToRGB", "load_rgb", "one_line", "to_rgb"]

_WHITE = (255, 255, 255)

# The longest side may be at most this many times the shortest. The evaluation transform scales
# the short side to image_size / 0.875: a 1 x 80,000,000 strip (within PIL's pixel limit) would
# become 256 x 20 billion pixels. At 32:1 and the largest image size (1024, short side 1170) an
# image is resized to at most 44 million pixels (131 MB); real photographs and panoramas stay
# well within 32:1.
MAX_ASPECT_RATIO = 32


def one_line(exc: BaseException) -> str:
    """``exc``'s message on one line (whitespace collapsed), or its type's name."""
    return " ".join(str(exc).split()) or type(exc).__name__


def _wide_grayto_rgb(image: Image.Image) -> Image.Image:
    """16/32-bit integer or float grayscale to 8-bit RGB.

    ``I;16*`` scales 0..65535 to 0..255; ``I`` keeps values up to 255, scales up to 65535 like
    ``I;16`` and anything larger by its maximum; ``F`` is taken as 0..1 when its maximum is <= 1,
    else as 0..255. Values are clipped to 0..255.
    """
    array = np.asarray(image, dtype=np.float64)
    peak = float(array.max()) if array.size else 0.0
    if image.mode.startswith("I;16"):
        scale = 255.0 / 65535.0
    elif image.mode == "F":
        scale = 255.0 if peak <= 1.0 else 1.0
    elif peak <= 255.0:
        scale = 1.0
    else:
        scale = 255.0 / 65535.0 if peak <= 65535.0 else 255.0 / peak
    gray = np.clip(np.rint(array * scale), 0, 255).astype(np.uint8)
    return Image.fromarray(gray).convert("RGB")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to RGB; transparent pixels are composited on white."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("RGBA", "RGBa", "LA", "PA") or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, _WHITE)
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    if mode.startswith("I") or mode == "F":
        return _wide_grayto_rgb(image)
    return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, ...


def _check_size(width: int, height: int) -> None:
    """Raises ``ValueError`` for an absurd size (see :func:`load_rgb`)."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and width * height > limit:
        raise ValueError(
            f"{width}x{height} pixels, more than the {limit} that PIL decodes without a warning"
        )
    short, long = sorted((width, height))
    if short < 1 or long > MAX_ASPECT_RATIO * short:
        raise ValueError(
            f"{width}x{height} pixels, an aspect ratio beyond {MAX_ASPECT_RATIO}:1 that resizing "
            "would blow up; crop it"
        )


def load_rgb(path: str) -> Image.Image:
    """Decode ``path`` fully (so corrupt or truncated data fails here) and return an RGB copy.

    The size is checked before decoding: PIL refuses more than twice ``Image.MAX_IMAGE_PIXELS``
    (a decompression bomb) and only warns above it; this refuses anything above it, and a
    longest side more than :data:`MAX_ASPECT_RATIO` times the shortest (the resize would
    blow up).

    Raises:
        OSError: not a regular file (a FIFO or a device would block or never end), or any
            error of reading it.
        ValueError: more pixels than ``Image.MAX_IMAGE_PIXELS`` or an aspect ratio beyond
            :data:`MAX_ASPECT_RATIO`.
    """
    if not stat.S_ISREG(os.stat(path).st_mode):  # follows symlinks; ELOOP raises here
        raise OSError(f"{path} is not a regular file")
    with Image.open(path) as image:
        _check_size(*image.size)
        image.load()
        try:
            upright = ImageOps.exif_transpose(image)  # a new image, rotated as the camera meant
        except Exception:  # a malformed EXIF block must not make a decodable image unreadable
            upright = image.copy()
    return to_rgb(upright)


class ToRGB:
    """Transform: convert a PIL image of any mode to RGB.

    A class rather than a lambda, so DataLoader workers can pickle it. Grayscale datasets (MNIST)
    then feed 3-channel networks.
    """

    def __call__(self, image: Image.Image) -> Image.Image:
        return image if image.mode == "RGB" else to_rgb(image)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
