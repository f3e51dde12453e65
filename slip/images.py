"""Read any user-supplied image into the one format SLIP uses: ``(H, W, 3) uint8`` RGB numpy.

:func:`load_image` accepts a path, encoded bytes, a PIL image or a numpy array, and fails with an
:class:`~slip.errors.ImageError` whose message names the source. The pixel limit is checked from the
header, BEFORE any pixel is decoded, so a small file claiming a huge size costs nothing.

Conversions, by PIL mode:

* ``RGB``: as is. ``L`` and ``1`` (gray, bilevel): gray copied to the three channels.
* ``RGBA``, ``LA``, ``PA``, ``RGBa``, ``La`` and ``P`` with a ``transparency`` entry: composited on
  BLACK (``rgb * alpha / 255``), the same colour the paper's crops use behind a segment. ``P``
  without transparency: its palette colours.
* ``CMYK``, ``YCbCr``, ``HSV`` and the other colour modes: PIL's conversion to RGB.
* ``I;16`` (and its byte orders) and ``I``: 16-bit values, scaled to 8 bits by ``round(v / 257)``;
  ``I`` is clipped to ``[0, 65535]`` first.
* ``F`` (32-bit float): values in ``[0, 1]`` are scaled by 255; any other range is min-max
  normalised to ``[0, 255]``; NaN becomes 0.

EXIF orientation is applied (a phone photo tagged "rotate 90°" comes back upright); of an animated
image, the first frame is used.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from slip.errors import ImageError, ImageTooLargeError

DEFAULT_MAX_PIXELS = 64_000_000  # 64 megapixels, e.g. 8000 x 8000
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
ImageSource = str | Path | bytes | bytearray | memoryview | Image.Image | np.ndarray


def load_image(source: ImageSource, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode ``source`` into a ``(H, W, 3) uint8`` RGB array (a fresh, C-contiguous copy).

    ``source``: a file path (``str`` / ``Path``), the encoded file's bytes, a ``PIL.Image.Image``,
    or an ``(H, W, 3) uint8`` numpy array. ``max_pixels``: the largest ``H * W`` accepted.

    Raises :class:`~slip.errors.ImageTooLargeError` above ``max_pixels`` (or above PIL's own
    decompression-bomb limit, 2 x ``PIL.Image.MAX_IMAGE_PIXELS``), and
    :class:`~slip.errors.ImageError` for a missing file, an unknown format, corrupt or truncated
    data, an unsupported mode, or an array of the wrong shape or dtype.
    """
    if isinstance(source, np.ndarray):
        return _from_array(source, max_pixels)
    if isinstance(source, Image.Image):
        _check_size(source.size, max_pixels, "the PIL image")
        return _decode(source, "the PIL image")
    name, stream = _open_stream(source)
    with stream:
        image = _open_image(stream, name)
        with image:
            _check_size(image.size, max_pixels, name)
            return _decode(image, name)


def image_sha256(data: bytes) -> str:
    """Hex SHA-256 of an encoded image's bytes (a cache key for its proposals)."""
    return hashlib.sha256(data).hexdigest()


# --- stages -------------------------------------------------------------------------------------------


def _open_stream(source: object) -> tuple[str, io.IOBase]:
    """A path or bytes -> (a name for messages, a readable binary stream)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes>", io.BytesIO(bytes(source))
    if isinstance(source, (str, Path)):
        path = Path(source)
        try:
            return str(path), path.open("rb")
        except FileNotFoundError as e:
            raise ImageError(f"no such file: {path}") from e
        except IsADirectoryError as e:
            raise ImageError(f"{path} is a directory, not an image file") from e
        except OSError as e:
            raise ImageError(f"cannot read {path}: {e.strerror or e}") from e
    raise ImageError(
        f"cannot load an image from a {type(source).__name__}: pass a path, bytes, a PIL image or an (H, W, 3) uint8 array"
    )


def _open_image(stream: io.IOBase, name: str) -> Image.Image:
    """Read only the header; PIL's own bomb check becomes :class:`ImageTooLargeError`."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit applies next
            return Image.open(stream)
    except Image.DecompressionBombError as e:
        raise ImageTooLargeError(f"{name} is too large to decode safely: {e}") from e
    except UnidentifiedImageError as e:
        raise ImageError(f"{name} is not an image in a format PIL can read (PNG, JPEG, WebP, TIFF, BMP, GIF, ...)") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageError(f"{name} is corrupt: {e}") from e


def _check_size(size: tuple[int, int], max_pixels: int, name: str) -> None:
    width, height = size
    if width * height > max_pixels:
        raise ImageTooLargeError(
            f"{name} is {width}x{height} = {width * height / 1e6:.1f} megapixels, over the limit of "
            f"{max_pixels / 1e6:.1f} megapixels: downscale it first"
        )


def _decode(image: Image.Image, name: str) -> np.ndarray:
    """Decode the pixels, apply EXIF orientation and convert the mode (see the module docstring)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image.load()
            image = ImageOps.exif_transpose(image)
            return np.array(_to_rgb(image), dtype=np.uint8, order="C", copy=True)  # writable, owned
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageTooLargeError(f"{name} is too large to decode safely: {e}") from e
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as e:
        raise ImageError(f"{name} is corrupt or truncated and could not be decoded: {e}") from e


def _to_rgb(image: Image.Image) -> np.ndarray:
    """A loaded PIL image in any mode -> ``(H, W, 3) uint8``."""
    mode = image.mode
    if mode == "RGB":
        return np.asarray(image)
    if mode == "P" and "transparency" in image.info or mode in _ALPHA_MODES:
        rgba = np.asarray(image.convert("RGBA"), dtype=np.uint16)
        rgb = (rgba[..., :3] * rgba[..., 3:] + 127) // 255  # composite on black, rounded
        return rgb.astype(np.uint8)
    if mode in _SIXTEEN_BIT or mode == "I":
        return _gray_to_rgb(_sixteen_to_eight(np.asarray(image)))
    if mode == "F":
        return _gray_to_rgb(_float_to_eight(np.asarray(image, dtype=np.float64)))
    try:
        return np.asarray(image.convert("RGB"))
    except ValueError as e:
        raise ImageError(f"image mode {mode!r} cannot be converted to RGB") from e


def _sixteen_to_eight(values: np.ndarray) -> np.ndarray:
    """``(H, W)`` integers in ``[0, 65535]`` (clipped) -> uint8 via ``round(v / 257)``."""
    wide = np.clip(values.astype(np.int64), 0, 65535)
    return ((wide + 128) // 257).astype(np.uint8)


def _float_to_eight(values: np.ndarray) -> np.ndarray:
    """``(H, W)`` floats -> uint8: ``[0, 1]`` scaled by 255, other ranges min-max normalised, NaN -> 0."""
    values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 1.0)
    if low < 0.0 or high > 1.0:
        values = (values - low) / (high - low) if high > low else np.zeros_like(values)
    return np.round(values * 255.0).astype(np.uint8)


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[..., None], 3, axis=2)


def _from_array(array: np.ndarray, max_pixels: int) -> np.ndarray:
    """Validate an ``(H, W, 3) uint8`` array and return a contiguous copy."""
    if array.ndim != 3 or array.shape[2] != 3:
        raise ImageError(f"an image array must be (H, W, 3) RGB, got shape {array.shape}")
    if array.dtype != np.uint8:
        raise ImageError(f"an image array must be uint8, got {array.dtype}: scale to 0..255 and cast first")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ImageError(f"an image array must have pixels, got shape {array.shape}")
    _check_size((array.shape[1], array.shape[0]), max_pixels, "the image array")
    return np.array(array, dtype=np.uint8, order="C", copy=True)
