"""Image decoding into uint8 RGB and resizing for the image cache.

Real dataset folders contain every kind of image file. ``decode_rgb`` handles each kind on
purpose:

- grayscale: copied into three equal channels.
- palette PNG: expanded to its colours (OpenCV does this while decoding).
- alpha (RGBA, grayscale + alpha, palette with a transparent entry): composited over black,
  ``rgb * alpha / max``. Black makes the result independent of whatever colour a file stores
  under fully transparent pixels, and equals the common ``(0, 0, 0, 0)`` transparent pixel.
- 16-bit PNG or TIFF: scaled to 8 bits with rounding, ``round(v * 255 / 65535)``, not
  truncated to the high or low byte.
- JPEG (found by content, not extension): decoded with Pillow, which converts CMYK and YCCK
  (including Adobe's inverted CMYK) to RGB and raises on truncated data. The EXIF orientation
  tag is applied, so the pixels match what an image viewer shows.
- truncated, empty or unreadable files and unsupported sample types: ``BadImageError``
  naming the file.

Everything except JPEG is decoded with ``cv2.imdecode(..., cv2.IMREAD_UNCHANGED)``, whose BGR
channel order is converted to RGB here.
"""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps

logger = logging.getLogger(__name__)

# Extensions (lower case) that the readers treat as images. Files are decoded by content,
# so a PNG saved as ``.jpg`` still decodes.
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".bmp", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp"}
)

_JPEG_MAGIC = b"\xff\xd8\xff"


class BadImageError(ValueError):
    """An image file that cannot be decoded into an RGB image.

    ``path`` is the file and ``reason`` the failure without the path; the message is
    ``"<path>: <reason>"``.
    """

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = Path(path)
        self.reason = reason

    def __reduce__(self):  # keeps the error picklable for worker processes
        return (type(self), (self.path, self.reason))


def is_image_file(path: str | os.PathLike) -> bool:
    """Return whether the extension of ``path`` (in any case) is one of ``IMAGE_EXTENSIONS``."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def decode_rgb(path: str | os.PathLike) -> np.ndarray:
    """Decode an image file into a uint8 RGB array [H, W, 3].

    Raises ``BadImageError`` naming the file when it is missing, empty, truncated, not an
    image, or has a sample type other than 8-bit or 16-bit unsigned integers.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise BadImageError(path, f"cannot read the file ({error})") from error
    return decode_rgb_bytes(data, path)


def decode_rgb_bytes(data: bytes, path: str | os.PathLike) -> np.ndarray:
    """Decode the bytes of an image file into a uint8 RGB array [H, W, 3].

    ``path`` names the file in errors. Raises ``BadImageError`` as ``decode_rgb`` does.
    """
    path = Path(path)
    if not data:
        raise BadImageError(path, "the file is empty (0 bytes)")

    if data.startswith(_JPEG_MAGIC):
        image = _decode_jpeg(data, path)
    else:
        image = _decode_with_opencv(data, path)
    return _to_rgb_uint8(image, path)


def _decode_jpeg(data: bytes, path: Path) -> np.ndarray:
    """Decode JPEG bytes with Pillow into an RGB or grayscale uint8 array."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            # Pillow raises OSError("image file is truncated") here unless
            # ImageFile.LOAD_TRUNCATED_IMAGES is set, which this module never sets.
            image.load()
            oriented = ImageOps.exif_transpose(image)
            if oriented.mode == "L":
                return np.asarray(oriented)
            # CMYK and YCCK (which Pillow decodes as CMYK) go through Pillow's conversion.
            # An RGB image passes unchanged.
            return np.asarray(oriented.convert("RGB"))
    except (OSError, SyntaxError, ValueError) as error:
        raise BadImageError(path, f"cannot decode the JPEG data ({error})") from error


def _decode_with_opencv(data: bytes, path: Path) -> np.ndarray:
    """Decode non-JPEG bytes with OpenCV and return RGB, RGBA or grayscale in file depth."""
    buffer = np.frombuffer(data, dtype=np.uint8)
    image = cv2.imdecode(buffer, cv2.IMREAD_UNCHANGED)
    if image is None or image.size == 0:
        raise BadImageError(
            path, "OpenCV cannot decode the file (truncated, corrupt or not an image)"
        )
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 3:
        channels = image.shape[2]
        if channels == 3:
            image = image[:, :, ::-1]  # BGR -> RGB
        elif channels == 4:
            image = image[:, :, [2, 1, 0, 3]]  # BGRA -> RGBA
        else:
            raise BadImageError(path, f"the image has {channels} channels; expected 1, 3 or 4")
    return image


def _to_rgb_uint8(image: np.ndarray, path: Path) -> np.ndarray:
    """Convert a decoded [H, W], [H, W, 3] or [H, W, 4] array into contiguous uint8 RGB."""
    if image.dtype == np.uint16:
        # Round instead of truncating: 65535 -> 255, 257 * k -> k, 1000 -> 4.
        image = ((image.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    elif image.dtype != np.uint8:
        raise BadImageError(
            path,
            f"the samples are of type {image.dtype}; only 8-bit and 16-bit unsigned "
            "integer images are supported",
        )

    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    elif image.shape[2] == 4:
        rgb = image[:, :, :3].astype(np.uint16)
        alpha = image[:, :, 3:4].astype(np.uint16)
        # Composite over black with rounding: rgb * alpha / 255.
        image = ((rgb * alpha + 127) // 255).astype(np.uint8)
    return np.ascontiguousarray(image)


def resize_interpolation(height: int, width: int, size: int) -> int:
    """Return the OpenCV interpolation flag used to resize an image of height x width to size.

    ``cv2.INTER_AREA`` when neither axis grows, because averaging the source pixels avoids
    aliasing. ``cv2.INTER_LINEAR`` when any axis grows, because there area averaging would
    behave like nearest-neighbour sampling.
    """
    if height >= size and width >= size:
        return cv2.INTER_AREA
    return cv2.INTER_LINEAR


def resize_rgb(image: np.ndarray, size: int) -> np.ndarray:
    """Resize a uint8 RGB image [H, W, 3] to [size, size, 3] without cropping or padding.

    The aspect ratio is not kept (SFEW's 143x181 faces are stretched to a square), which is
    what resizing to 256x256 before a 224 crop means.
    """
    height, width = image.shape[:2]
    if (height, width) == (size, size):
        return np.ascontiguousarray(image)
    interpolation = resize_interpolation(height, width, size)
    resized = cv2.resize(image, (size, size), interpolation=interpolation)
    return np.ascontiguousarray(resized)
