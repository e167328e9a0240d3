"""One robust image loader for the whole project.

EXIF orientation is applied; grey, palette, RGBA/LA, CMYK and 16-bit/float images become 8-bit RGB. A file that is
missing, empty, truncated or not an image raises `ImageError` naming the file.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageError

Image.MAX_IMAGE_PIXELS = 20000 * 20000  # allow big photographs, still refuse decompression bombs

IMAGE_EXT = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif"})  # what a folder offers


def image_files(folder) -> list[Path]:
    """The image files of ``folder`` (by extension, any case), sorted by name."""
    return sorted(q for q in Path(folder).iterdir() if q.suffix.lower() in IMAGE_EXT and q.is_file())


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") else max(float(a.max()), 1.0)
        if img.mode in ("I", "F") and a.max() <= 255:
            hi = 255.0
        a = np.clip(a / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        img = Image.fromarray(a, mode="L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        # composite over white: transparent regions become background, not black noise
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, rgba)
    if img.mode != "RGB":
        img = img.convert("RGB")
    return img


def open_image(path) -> Image.Image:
    """Open, fully decode, EXIF-orient and convert to RGB; `ImageError` names the file on failure."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: image file not found")
    if path.stat().st_size == 0:
        raise ImageError(f"{path}: empty file (0 bytes), not an image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as im:
                im.load()  # forces the decode: a truncated file raises here
                im = ImageOps.exif_transpose(im)
                return _to_rgb(im)
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image file (or an unsupported format)") from None
    except Image.DecompressionBombError as e:
        raise ImageError(f"{path}: image too large ({e})") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{path}: corrupt or truncated image ({e})") from None


def load_image(path) -> np.ndarray:
    """HxWx3 uint8 RGB array."""
    return np.asarray(open_image(path))


def raw_size_and_orientation(path) -> tuple[int, int, int]:
    """(width, height) as stored on disk (before EXIF orientation) and the EXIF orientation tag (1 = none), from the
    header only; (0, 0, 1) when the file cannot be read (loading it later raises the ImageError)."""
    try:
        with Image.open(path) as im:
            w, h = im.size
            orient = int(im.getexif().get(0x0112, 1) or 1)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, TypeError):
        return 0, 0, 1
    return w, h, orient if 1 <= orient <= 8 else 1


def image_size(path) -> tuple[int, int]:
    """(width, height) after EXIF orientation, reading only the header."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: image file not found")
    try:
        with Image.open(path) as im:
            w, h = im.size
            orient = im.getexif().get(0x0112, 1)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{path}: not a readable image ({e})") from None
    return (h, w) if orient in (5, 6, 7, 8) else (w, h)
