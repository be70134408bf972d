"""Loading user images the same way everywhere: EXIF rotation applied, any mode to RGB uint8, and a clear
error naming the file for anything that is not a usable image."""

from __future__ import annotations

import io
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from graphdistill.errors import GraphdistillError

# 12000 x 12000 is 144 MP: far past any teacher's input size. Bigger images are refused by default rather
# than decoded into gigabytes; ``max_pixels`` raises the cap when a user really means it.
DEFAULT_MAX_PIXELS = 64_000_000


# the file suffixes read as images wherever a folder or a path is taken (record, run, predict, inputs make)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")


class ImageError(GraphdistillError, ValueError):
    """An input image is unusable; the message names the input and what is wrong."""


def load_image(
    source: str | os.PathLike[str] | bytes | np.ndarray,
    *,
    name: str | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """Read an image into an HxWx3 uint8 RGB array.

    Handles EXIF orientation, grayscale, palette, RGBA (composited on white), 16-bit and float images.
    Raises :class:`ImageError` naming the input for a missing, empty, corrupt, non-image or enormous file.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    label = name or (str(source) if isinstance(source, (str, os.PathLike)) else "<image bytes>")
    if isinstance(source, np.ndarray):
        return to_rgb_uint8(source, label)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise ImageError(f"image {label}: no such file")
        if path.is_dir():
            raise ImageError(f"image {label}: is a directory, not an image file")
        if path.stat().st_size == 0:
            raise ImageError(f"image {label}: the file is empty (0 bytes)")
        data = path.read_bytes()
    else:
        data = bytes(source)
        if not data:
            raise ImageError(f"image {label}: no bytes")
    try:
        with warnings.catch_warnings():
            # Pillow's own bomb warning fires before our cap could name the size; the cap below decides
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = _pil_open(io.BytesIO(data))
            w, h = img.size
            if w * h > max_pixels:
                raise ImageError(
                    f"image {label}: {w}x{h} ({w * h / 1e6:.0f} MP) is larger than the {max_pixels / 1e6:.0f} MP "
                    "limit; downscale it first (or raise max_pixels)"
                )
            img.load()
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError(f"image {label}: too large to decode safely; downscale it first ({exc})") from exc
    except UnidentifiedImageError as exc:
        raise ImageError(
            f"image {label}: not a readable image file ({exc.__class__.__name__}: {exc})"
        ) from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"image {label}: corrupt or truncated image data ({exc})") from exc
    rotated = ImageOps.exif_transpose(img)
    return pil_to_rgb(rotated if rotated is not None else img, label)


def _pil_open(fp: io.BytesIO) -> Any:
    """Pillow's own ``Image.open``.

    Importing ultralytics replaces ``PIL.Image.open`` process-wide with a wrapper that, on an unidentified
    file, tries to install and import a HEIF plugin (``pi_heif``); a non-image input would then fail with
    ModuleNotFoundError instead of our clear error. Use the original Pillow function it keeps.
    """
    from PIL import Image

    patches = sys.modules.get("ultralytics.utils.patches")
    original = getattr(patches, "_image_open", None) if patches is not None else None
    return (original or Image.open)(fp)


def pil_to_rgb(img: object, label: str = "<image>") -> np.ndarray:
    from PIL import Image

    assert isinstance(img, Image.Image)
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return to_rgb_uint8(np.asarray(img), label)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, rgba)
    return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()


def to_rgb_uint8(arr: np.ndarray, label: str = "<array>") -> np.ndarray:
    """Any HxW / HxWx1 / HxWx3 / HxWx4 array of integers or floats -> HxWx3 uint8."""
    a = np.asarray(arr)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)) or min(a.shape[:2]) < 1:
        raise ImageError(f"image {label}: expected HxW or HxWx3/4 pixels, got shape {a.shape}")
    if a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    elif a.dtype != np.uint8:
        if np.issubdtype(a.dtype, np.floating):
            if not np.isfinite(a).all():
                raise ImageError(f"image {label}: has NaN or infinite pixel values")
            hi = 1.0 if a.max() <= 1.0 else 255.0
            a = np.clip(a / hi * 255.0, 0, 255).astype(np.uint8)
        elif np.issubdtype(a.dtype, np.integer):
            hi = 65535 if a.max() > 255 else 255
            a = np.clip(a.astype(np.float64) / hi * 255.0, 0, 255).round().astype(np.uint8)
        else:
            raise ImageError(f"image {label}: unsupported pixel type {a.dtype}")
    if a.ndim == 2:
        a = np.stack([a] * 3, axis=-1)
    if a.shape[2] == 4:
        alpha = a[:, :, 3:4].astype(np.float32) / 255.0
        a = (a[:, :, :3].astype(np.float32) * alpha + 255.0 * (1 - alpha)).round().astype(np.uint8)
    return np.ascontiguousarray(a)
