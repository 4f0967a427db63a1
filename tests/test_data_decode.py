"""Robust decoding: odd image modes become 8-bit RGB, undecodable bytes raise `ImageDecodeError`."""
from __future__ import annotations

import copy
import io
import pickle

import numpy as np
import pytest
from PIL import Image

from pipeline.data.decode import ImageDecodeError, SkipCounter, decode_image, sniff_format
from tests.test_data_convert import encode


def _rgb(w: int = 12, h: int = 8) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize(
    ("mode", "fmt", "ext"),
    [("CMYK", "JPEG", "jpg"), ("L", "JPEG", "jpg"), ("L", "PNG", "png"), ("P", "PNG", "png"), ("RGBA", "PNG", "png"),
     ("LA", "PNG", "png"), ("1", "PNG", "png"), ("RGB", "WEBP", "webp"), ("RGB", "BMP", "bmp")],
)  # fmt: skip
def test_odd_modes_decode_to_rgb(mode, fmt, ext):
    data = encode(_rgb().convert(mode), fmt)
    assert sniff_format(data) == ext
    img = decode_image(data)
    assert img.mode == "RGB" and img.size == (12, 8)


def test_cmyk_and_grayscale_keep_their_content():
    src = _rgb()
    cmyk = np.asarray(decode_image(encode(src.convert("CMYK"), "JPEG", quality=100)), dtype=float)
    assert np.abs(cmyk - np.asarray(src, dtype=float)).mean() < 12  # JPEG loss only, not garbage
    gray = np.asarray(decode_image(encode(src.convert("L"), "PNG")))
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 0] == np.asarray(src.convert("L"))).all()


def test_16bit_png_is_rescaled_not_clipped():
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    data = encode(Image.fromarray(values), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    rgb = np.asarray(decode_image(data))
    assert rgb[0, :, 0].tolist() == [0, 1, 128, 255]  # a plain convert("RGB") would clip to 255


def test_transparency_is_composited_on_white():
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert np.asarray(decode_image(encode(rgba, "PNG"))).min() == 255
    palette = Image.new("P", (4, 4), 0)
    palette.info["transparency"] = 0
    assert np.asarray(decode_image(encode(palette, "PNG", transparency=0))).min() == 255


@pytest.mark.parametrize(
    "data",
    [b"", b"definitely not an image", encode(_rgb(64, 64), "JPEG")[:300], encode(_rgb(64, 64), "PNG")[:-40]],
    ids=["empty", "garbage", "truncated-jpeg", "truncated-png"],
)
def test_undecodable_bytes_raise(data):
    with pytest.raises(ImageDecodeError):
        decode_image(data)


def test_skip_counter_copies_are_independent_snapshots():
    counter = SkipCounter()
    counter.increment(3)
    clone = copy.deepcopy(counter)
    restored = pickle.loads(pickle.dumps(counter))
    counter.increment()
    assert (counter.value, clone.value, restored.value) == (4, 3, 3)
