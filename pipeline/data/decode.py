"""Robust image decoding: encoded bytes -> 8-bit RGB PIL image, whatever the source mode.

ImageNet-scale folders contain oddities (CMYK and grayscale JPEGs, PNGs saved with a `.JPEG` name,
16-bit and palette PNGs, images with alpha). Models want 3-channel 8-bit input, so every mode is
mapped to RGB here, in one place, and anything PIL cannot fully decode raises `ImageDecodeError`
so that the caller can skip and count it instead of crashing a multi-day run.
"""
from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageFile

__all__ = ["IMAGE_EXTENSIONS", "ImageDecodeError", "SkipCounter", "decode_image", "sniff_format", "to_rgb"]

# Extensions (webdataset sample keys) that hold an encoded image, in lookup order.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm")

# PIL format name -> canonical file extension used in shards.
_FORMAT_EXTENSIONS = {
    "JPEG": "jpg",
    "MPO": "jpg",  # multi-picture JPEG (some cameras); the first frame is a plain JPEG
    "PNG": "png",
    "WEBP": "webp",
    "BMP": "bmp",
    "GIF": "gif",
    "TIFF": "tiff",
    "PPM": "ppm",
}

# Truncated files must fail loudly; never let PIL pad them with grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class ImageDecodeError(ValueError):
    """Raised when bytes are not a fully decodable image."""


def sniff_format(data: bytes) -> str:
    """Return the canonical extension (`jpg`, `png`, ...) of encoded image bytes from their header.

    Only parses the header (cheap); raises `ImageDecodeError` if PIL does not recognise the bytes.
    """
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = img.format
    except Exception as err:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ...
        raise ImageDecodeError(f"not an image: {err}") from err
    ext = _FORMAT_EXTENSIONS.get(fmt or "")
    if ext is None:
        raise ImageDecodeError(f"unsupported image format {fmt!r}; accepted: {sorted(_FORMAT_EXTENSIONS)}")
    return ext


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert a PIL image of any mode to 8-bit RGB.

    Alpha is composited over white (transparent regions are usually background, and black would
    invent dark edges); 16/32-bit integer and float images are rescaled to 0..255 rather than
    clipped, which is what a plain `convert("RGB")` would do.
    """
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16"):
            scale = 255.0 / 65535.0
        else:
            # 32-bit ints/floats have no fixed range: stretch min..max to 0..255.
            lo, hi = float(arr.min()), float(arr.max())
            arr, scale = arr - lo, (255.0 / (hi - lo) if hi > lo else 0.0)
        gray = np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    # L, 1, P, CMYK, YCbCr, LAB, HSV: PIL's own conversions are right for these.
    return img.convert("RGB")


def decode_image(data: bytes) -> Image.Image:
    """Decode encoded image bytes (any PIL-readable format) into an 8-bit RGB PIL image.

    Raises `ImageDecodeError` for empty, truncated or otherwise undecodable bytes.
    """
    if not data:
        raise ImageDecodeError("empty image bytes")
    try:
        with warnings.catch_warnings():
            # Corrupt EXIF and similar metadata warnings are harmless here; decompression-bomb
            # warnings are turned into errors so giant images are skipped rather than OOM a worker.
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            # No `with`: closing an image destroys its pixels, and to_rgb may return it as is.
            img = Image.open(io.BytesIO(data))
            img.load()  # force the full decode now so truncation surfaces here
            return to_rgb(img)
    except ImageDecodeError:
        raise
    except Exception as err:
        raise ImageDecodeError(f"undecodable image ({type(err).__name__}: {err})") from err


class SkipCounter:
    """Number of skipped samples, shared by a process and the DataLoader workers it starts.

    Backed by a `multiprocessing.Value`, which forked or spawned DataLoader workers inherit, so
    increments made in workers are visible to the training process. Pickled any other way (e.g.
    `copy.deepcopy` of a data module) it becomes an independent counter starting at the current count.
    """

    def __init__(self, initial: int = 0) -> None:
        import multiprocessing

        self._value = multiprocessing.Value("q", initial)

    @property
    def value(self) -> int:
        """The current count."""
        return int(self._value.value)

    def increment(self, n: int = 1) -> None:
        """Add `n` (atomically across processes)."""
        with self._value.get_lock():
            self._value.value += n

    def __getstate__(self) -> dict:
        from multiprocessing.context import get_spawning_popen

        if get_spawning_popen() is not None:  # being sent to a child process at its start: share
            return {"shared": self._value}
        return {"count": self.value}

    def __setstate__(self, state: dict) -> None:
        if "shared" in state:
            self._value = state["shared"]
        else:
            self.__init__(state["count"])
