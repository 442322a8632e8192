"""Decoding and fitting the `input_reference` image (Pillow only)."""
from __future__ import annotations

import io
import math
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from wanserve.api.errors import InvalidRequest, PayloadTooLarge, UnsupportedMediaType

# Pillow format names accepted for `input_reference`.
ALLOWED_FORMATS = {"PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"}

_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
_WHITE = (255, 255, 255)


def decode_image(data: bytes, *, max_bytes: int, max_pixels: int,
                 param: str = "input_reference") -> Image.Image:
    """Decode untrusted image bytes into an RGB image, or raise an APIError."""
    if not data:
        raise InvalidRequest(f"{param} is empty", param, code="invalid_image")
    if len(data) > max_bytes:
        raise PayloadTooLarge(f"{param} is {len(data)} bytes; the limit is {max_bytes} bytes",
                              param, code="image_too_large")
    allowed = ", ".join(sorted(ALLOWED_FORMATS))
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data), formats=list(ALLOWED_FORMATS)) as img:
                width, height = img.size
                # Checked on the declared header size, before any pixel is decoded.
                if width * height > max_pixels:
                    raise InvalidRequest(
                        f"{param} is {width}x{height} ({width * height} pixels); "
                        f"the limit is {max_pixels} pixels", param, code="image_too_large")
                img.seek(0)  # GIF / multi-frame TIFF / WebP: first frame only
                img.load()
                img = ImageOps.exif_transpose(img)
                return _to_rgb(img)
        except UnidentifiedImageError:
            raise UnsupportedMediaType(
                f"{param} is not a supported image; allowed formats: {allowed}",
                param, code="unsupported_image_type") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise InvalidRequest(f"{param} is too large: {exc}", param,
                                 code="image_too_large") from None
        except InvalidRequest:
            raise
        except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError,
                KeyError, MemoryError) as exc:
            raise InvalidRequest(f"{param} could not be decoded: {exc}", param,
                                 code="invalid_image") from None


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode in _ALPHA_MODES or (mode in {"P", "L", "RGB"} and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode.startswith("I;16"):
        # uint16 (any byte order) → uint8: 65535 / 257 == 255.
        arr = np.asarray(img).astype(np.float64) / 257.0
        return _gray_to_rgb(arr)
    if mode == "I":
        # Signed 32-bit. Most such images carry 16-bit data (legacy 16-bit PNG/TIFF), so
        # only use the full 32-bit range when the values do not fit in 16 bits.
        arr = np.asarray(img).astype(np.float64)
        scale = 257.0 if arr.max(initial=0) <= 0xFFFF else (2**31 - 1) / 255.0
        return _gray_to_rgb(arr / scale)
    if mode == "F":
        # Pillow's convention: "F" shares L's 0..255 scale (convert("F") from L keeps values).
        return _gray_to_rgb(np.nan_to_num(np.asarray(img, dtype=np.float64)))
    return img.convert("RGB")


def _gray_to_rgb(arr: np.ndarray) -> Image.Image:
    gray = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    return Image.fromarray(gray, mode="L").convert("RGB")


def fit_to_size(img: Image.Image, width: int, height: int) -> np.ndarray:
    """Scale to cover width×height keeping the aspect ratio, centre-crop; HxWx3 uint8."""
    if width <= 0 or height <= 0:
        raise ValueError(f"target size must be positive, got {width}x{height}")
    # ImageOps.fit crops the centred region of the target aspect in source space, then
    # resamples it: the same as scale-to-cover + centre-crop, with no distortion.
    fitted = ImageOps.fit(img.convert("RGB"), (width, height),
                          method=Image.Resampling.LANCZOS, centering=(0.5, 0.5))
    out = np.asarray(fitted, dtype=np.uint8)
    assert out.shape == (height, width, 3)
    return out


def size_for_aspect(img_width: int, img_height: int, pixel_area: int,
                    multiple: int = 16) -> tuple[int, int]:
    """(width, height) of about `pixel_area` pixels with the image's aspect ratio."""
    if img_width <= 0 or img_height <= 0 or pixel_area <= 0 or multiple <= 0:
        raise ValueError("sizes, area and multiple must be positive")
    aspect = img_width / img_height
    width = math.sqrt(pixel_area * aspect)
    height = math.sqrt(pixel_area / aspect)

    def snap(x: float) -> int:
        return max(multiple, int(round(x / multiple)) * multiple)

    # For extreme aspect ratios the short side is clamped up to `multiple`; derive the
    # long side from the area then, so the pixel budget is kept rather than multiplied.
    if height < multiple:
        return snap(pixel_area / multiple), multiple
    if width < multiple:
        return multiple, snap(pixel_area / multiple)
    return snap(width), snap(height)
