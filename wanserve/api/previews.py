"""Preview images of a stored MP4 (`GET /v1/videos/{id}/content?variant=...`), PyAV + Pillow.

Made from the MP4 on request rather than at encode time: the encode path stays as it is, videos
stored before previews existed have them too, and a job nobody previews costs nothing. A
thumbnail decodes only up to its frame; a sprite sheet decodes the clip once (81 frames at
832x480 in well under a second).

- `thumbnail`: the middle frame (index (F - 1) // 2; the first is the caller's own image), at
  the video's size, as WebP.
- `spritesheet`: `min(F, SPRITE_MAX_FRAMES)` evenly spaced frames (index round(i (F - 1) /
  (n - 1)), the first and the last included) as tiles of at most SPRITE_TILE_WIDTH pixels wide,
  row by row in a grid `ceil(sqrt(n))` columns wide, as one JPEG. `sprite_headers` names the
  layout.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path

import av
from PIL import Image

VARIANTS = ("video", "thumbnail", "spritesheet")
THUMBNAIL_TYPE = "image/webp"
SPRITE_TYPE = "image/jpeg"
SPRITE_MAX_FRAMES = 16
SPRITE_TILE_WIDTH = 256
_QUALITY = 90


@dataclass
class SpriteSheet:
    image: bytes
    frames: list[int]  # the video frame of each tile, row by row
    columns: int
    rows: int
    tile_width: int
    tile_height: int


def thumbnail_index(frames: int) -> int:
    return (frames - 1) // 2


def sprite_indices(frames: int) -> list[int]:
    count = min(frames, SPRITE_MAX_FRAMES)
    if count == 1:
        return [0]
    return [round(i * (frames - 1) / (count - 1)) for i in range(count)]


def sprite_tile_size(width: int, height: int) -> tuple[int, int]:
    if width <= SPRITE_TILE_WIDTH:
        return width, height
    return SPRITE_TILE_WIDTH, max(1, round(height * SPRITE_TILE_WIDTH / width))


def _frames(path: Path):
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            yield frame.to_image()  # RGB, whatever the stored pixel format


def thumbnail(path: Path, frames: int) -> bytes:
    wanted = thumbnail_index(frames)
    for index, image in enumerate(_frames(path)):
        if index == wanted:
            out = io.BytesIO()
            image.save(out, format="WEBP", quality=_QUALITY, method=4)
            return out.getvalue()
    raise ValueError(f"{path.name} has fewer than {wanted + 1} frames")


def spritesheet(path: Path, frames: int) -> SpriteSheet:
    indices = sprite_indices(frames)
    wanted = set(indices)
    tiles = {}
    for index, image in enumerate(_frames(path)):
        if index in wanted:
            tiles[index] = image
    if len(tiles) != len(wanted):
        raise ValueError(f"{path.name} has fewer frames than its job says ({frames})")
    first = tiles[indices[0]]
    tile_w, tile_h = sprite_tile_size(first.width, first.height)
    columns = math.ceil(math.sqrt(len(indices)))
    rows = math.ceil(len(indices) / columns)
    sheet = Image.new("RGB", (columns * tile_w, rows * tile_h))
    for slot, index in enumerate(indices):
        tile = tiles[index]
        if tile.size != (tile_w, tile_h):
            tile = tile.resize((tile_w, tile_h), Image.Resampling.LANCZOS)
        sheet.paste(tile, ((slot % columns) * tile_w, (slot // columns) * tile_h))
    out = io.BytesIO()
    sheet.save(out, format="JPEG", quality=_QUALITY)
    return SpriteSheet(out.getvalue(), indices, columns, rows, tile_w, tile_h)


def sprite_headers(sheet: SpriteSheet) -> dict[str, str]:
    return {"X-Sprite-Columns": str(sheet.columns), "X-Sprite-Rows": str(sheet.rows),
            "X-Sprite-Tile-Width": str(sheet.tile_width),
            "X-Sprite-Tile-Height": str(sheet.tile_height),
            "X-Sprite-Frames": ",".join(map(str, sheet.frames))}
