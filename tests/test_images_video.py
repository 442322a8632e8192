"""Unit tests for wanserve.api.images and wanserve.api.video: real Pillow images, real PyAV encode/decode."""
from __future__ import annotations

import io

import av
import numpy as np
import pytest
from PIL import Image

from wanserve.api.errors import InvalidRequest, PayloadTooLarge, UnsupportedMediaType
from wanserve.api.images import ALLOWED_FORMATS, decode_image, fit_to_size, size_for_aspect
from wanserve.api.video import encode_mp4, is_faststart, probe_mp4
from wanserve.engine.config import load_config

LIMITS = {"max_bytes": 10 * 1024 * 1024, "max_pixels": 4096 * 4096}


def encoded(img: Image.Image, fmt: str, **save_kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save_kwargs)
    return buf.getvalue()


def decode(data: bytes, **overrides) -> Image.Image:
    return decode_image(data, **{**LIMITS, **overrides})


@pytest.mark.parametrize("fmt", sorted(ALLOWED_FORMATS))
def test_each_allowed_format_round_trips_to_rgb(fmt):
    src = Image.new("RGB", (40, 24), (200, 100, 50))
    img = decode(encoded(src, fmt))
    assert img.mode == "RGB" and img.size == (40, 24)
    assert all(abs(a - b) <= 12 for a, b in zip(img.getpixel((20, 12)), (200, 100, 50)))


def test_rgba_transparent_pixel_becomes_white():
    src = Image.new("RGBA", (8, 8), (255, 0, 0, 255))
    src.putpixel((0, 0), (0, 0, 0, 0))
    img = decode(encoded(src, "PNG"))
    assert img.getpixel((0, 0)) == (255, 255, 255)
    assert img.getpixel((4, 4)) == (255, 0, 0)


def test_palette_with_transparency_becomes_white():
    src = Image.new("P", (8, 8), 1)
    src.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    src.putpixel((0, 0), 0)
    img = decode(encoded(src, "PNG", transparency=0))
    assert img.getpixel((0, 0)) == (255, 255, 255)
    assert img.getpixel((4, 4)) == (0, 0, 255)


def test_grayscale_l():
    img = decode(encoded(Image.new("L", (8, 8), 77), "PNG"))
    assert img.mode == "RGB" and img.getpixel((3, 3)) == (77, 77, 77)


def test_cmyk_jpeg():
    img = decode(encoded(Image.new("CMYK", (16, 16), (0, 0, 0, 0)), "JPEG"))
    assert img.mode == "RGB"
    assert all(c >= 245 for c in img.getpixel((8, 8)))


def test_sixteen_bit_png_scales_to_eight_bit():
    arr = np.full((6, 6), 65535, np.uint16)
    arr[0, 0] = 0
    arr[1, 1] = 257 * 128
    data = encoded(Image.fromarray(arr), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    img = decode(data)
    assert img.getpixel((3, 3)) == (255, 255, 255)
    assert img.getpixel((0, 0)) == (0, 0, 0)
    assert img.getpixel((1, 1)) == (128, 128, 128)


def test_one_bit():
    src = Image.new("1", (8, 8), 0)
    src.putpixel((2, 2), 1)
    img = decode(encoded(src, "PNG"))
    assert img.getpixel((2, 2)) == (255, 255, 255)
    assert img.getpixel((0, 0)) == (0, 0, 0)


def test_exif_orientation_is_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to display
    data = encoded(Image.new("RGB", (64, 32), (10, 200, 10)), "JPEG", exif=exif.tobytes())
    assert decode(data).size == (32, 64)


def test_gif_uses_first_frame():
    frames = [Image.new("RGB", (16, 16), c) for c in [(255, 0, 0), (0, 0, 255)]]
    data = encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)
    assert Image.open(io.BytesIO(data)).n_frames == 2
    img = decode(data)
    assert img.size == (16, 16) and img.getpixel((8, 8)) == (255, 0, 0)


def test_empty_bytes():
    with pytest.raises(InvalidRequest) as err:
        decode(b"")
    assert err.value.code == "invalid_image" and err.value.param == "input_reference"


def test_truncated_png():
    rng = np.random.default_rng(0)
    data = encoded(Image.fromarray(rng.integers(0, 255, (64, 64, 3), np.uint8)), "PNG")
    with pytest.raises(InvalidRequest) as err:
        decode(data[: len(data) // 2])
    assert err.value.code == "invalid_image"


def test_garbage_bytes_are_unsupported():
    with pytest.raises(UnsupportedMediaType) as err:
        decode(np.random.default_rng(1).bytes(512))
    assert err.value.status == 415 and err.value.code == "unsupported_image_type"


@pytest.mark.parametrize("fmt", ["ICO", "PPM"])
def test_format_outside_the_list_is_unsupported(fmt):
    with pytest.raises(UnsupportedMediaType):
        decode(encoded(Image.new("RGB", (16, 16), (1, 2, 3)), fmt))


def test_over_max_bytes():
    data = encoded(Image.new("RGB", (8, 8)), "PNG")
    with pytest.raises(PayloadTooLarge) as err:
        decode(data, max_bytes=len(data) - 1)
    assert err.value.status == 413 and str(len(data) - 1) in err.value.message


@pytest.mark.parametrize("side", [5000, 20000])  # below / above Pillow's own bomb limit
def test_declared_size_over_max_pixels(side):
    data = encoded(Image.new("1", (side, side)), "PNG")
    assert len(data) < 100_000
    with pytest.raises(InvalidRequest) as err:
        decode(data, max_pixels=1024 * 1024)
    assert err.value.code == "image_too_large"


def test_fit_to_size_keeps_aspect_ratio():
    src = Image.new("RGB", (200, 100), (255, 0, 0))
    src.paste((0, 0, 255), (100, 0, 200, 100))
    out = fit_to_size(src, 64, 64)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    assert tuple(out[32, 4]) == (255, 0, 0)
    assert tuple(out[32, 59]) == (0, 0, 255)


def test_fit_to_size_exact_target_for_odd_aspects():
    out = fit_to_size(Image.new("RGB", (333, 777), (9, 9, 9)), 832, 480)
    assert out.shape == (480, 832, 3)


@pytest.mark.parametrize("w,h,area", [(1920, 1080, 832 * 480), (1080, 1920, 832 * 480),
                                      (500, 500, 128 * 128), (3000, 700, 1280 * 720)])
def test_size_for_aspect(w, h, area):
    out_w, out_h = size_for_aspect(w, h, area)
    assert out_w % 16 == 0 and out_h % 16 == 0
    assert abs(out_w * out_h - area) / area < 0.1
    assert abs(out_w / out_h - w / h) / (w / h) < 0.05


def test_size_for_aspect_examples():
    assert size_for_aspect(500, 500, 128 * 128) == (128, 128)
    assert size_for_aspect(1920, 1080, 832 * 480) == (848, 480)
    # Extreme aspect: the short side is clamped, the long side keeps the area budget.
    assert size_for_aspect(10000, 1, 832 * 480) == (24960, 16)
    assert size_for_aspect(1, 10000, 832 * 480) == (16, 24960)


@pytest.mark.parametrize("count,width,height,fps", [(9, 64, 48, 8), (17, 128, 96, 16)])
def test_encode_mp4_round_trip(count, width, height, fps):
    frames = np.random.default_rng(2).random((count, height, width, 3), dtype=np.float32)
    data = encode_mp4(frames, fps)
    info = probe_mp4(data)
    assert info == {"frames": count, "width": width, "height": height, "fps": float(fps),
                    "codec": "h264", "pix_fmt": "yuv420p"}
    assert is_faststart(data)


def test_encode_mp4_every_fps_up_to_the_limit():
    """Each fps a request may ask for (1..limits.max_fps) keeps its frame count, rate and
    timestamps. checked with: `rate = Fraction(min(fps, 30))` in wanserve/api/video.py encode_mp4."""
    max_fps = load_config([]).limits.max_fps
    frames = np.random.default_rng(3).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    for fps in range(1, max_fps + 1):
        with av.open(io.BytesIO(encode_mp4(frames, fps))) as container:
            stream = container.streams.video[0]
            times = [f.time for f in container.decode(stream)]
            assert (len(times), stream.average_rate) == (5, fps), fps
        assert times == pytest.approx([i / fps for i in range(5)], abs=1e-3), fps


def test_constant_grey_survives_encoding():
    data = encode_mp4(np.full((5, 48, 64, 3), 0.5, np.float32), 8)
    with av.open(io.BytesIO(data)) as container:
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(decoded) == 5
    for frame in decoded:
        assert np.abs(frame.astype(int) - 128).max() <= 3


def test_uint8_input_is_accepted():
    frames = np.full((3, 32, 32, 3), 200, np.uint8)
    assert probe_mp4(encode_mp4(frames, 8))["frames"] == 3


def test_encode_mp4_rejects_odd_size_and_bad_shape():
    with pytest.raises(ValueError):
        encode_mp4(np.zeros((2, 33, 32, 3), np.uint8), 8)
    with pytest.raises(ValueError):
        encode_mp4(np.zeros((2, 32, 32), np.uint8), 8)


def test_is_faststart_box_parsing():
    def box(kind: bytes, payload: bytes = b"") -> bytes:
        return (8 + len(payload)).to_bytes(4, "big") + kind + payload

    large_mdat = (1).to_bytes(4, "big") + b"mdat" + (16 + 4).to_bytes(8, "big") + b"\0" * 4
    assert is_faststart(box(b"ftyp", b"isom") + box(b"moov") + box(b"mdat", b"x"))
    assert not is_faststart(box(b"ftyp", b"isom") + box(b"mdat", b"x") + box(b"moov"))
    assert not is_faststart(box(b"ftyp") + large_mdat + box(b"moov"))
    assert is_faststart(box(b"ftyp") + box(b"free") + box(b"moov") + large_mdat)
    assert not is_faststart(b"")
