"""The soak's samples as one PNG of small line charts, drawn with Pillow (no plotting library)."""
from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

PANEL_W, PANEL_H, MARGIN = 520, 230, 46
COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14)]


def draw_panel(draw: ImageDraw.ImageDraw, left: int, top: int, title: str,
               series: dict[str, list[tuple[float, float]]], warmup_s: float | None) -> None:
    """One chart at (left, top): each named series of (seconds, value) as a line."""
    x0, y0 = left + MARGIN, top + 28
    x1, y1 = left + PANEL_W - 12, top + PANEL_H - 26
    points = [p for values in series.values() for p in values]
    draw.text((left + 8, top + 6), title, fill="black")
    draw.rectangle((x0, y0, x1, y1), outline=(160, 160, 160))
    if not points:
        return
    t_max = max(t for t, _ in points) or 1.0
    low, high = min(v for _, v in points), max(v for _, v in points)
    if high == low:
        low, high = low - 1, high + 1

    def xy(t: float, v: float) -> tuple[float, float]:
        return x0 + (x1 - x0) * t / t_max, y1 - (y1 - y0) * (v - low) / (high - low)

    if warmup_s:
        wx = xy(min(warmup_s, t_max), low)[0]
        draw.line((wx, y0, wx, y1), fill=(200, 200, 200))
        draw.text((wx + 3, y0 + 2), "warm-up", fill=(150, 150, 150))
    for index, (name, values) in enumerate(series.items()):
        colour = COLOURS[index % len(COLOURS)]
        if len(values) > 1:
            draw.line([xy(t, v) for t, v in values], fill=colour, width=2)
        draw.text((x1 - 110, y0 + 4 + 12 * index), name, fill=colour)
    draw.text((left + 4, y0 - 4), f"{high:.4g}", fill="black")
    draw.text((left + 4, y1 - 10), f"{low:.4g}", fill="black")
    draw.text((x1 - 50, y1 + 6), f"{t_max:.0f} s", fill="black")


def write_plot(path: Path, panels: list[tuple[str, dict]], warmup_s: float | None,
               columns: int = 2) -> None:
    rows = (len(panels) + columns - 1) // columns
    image = Image.new("RGB", (columns * PANEL_W, rows * PANEL_H), "white")
    draw = ImageDraw.Draw(image)
    for index, (title, series) in enumerate(panels):
        draw_panel(draw, (index % columns) * PANEL_W, (index // columns) * PANEL_H, title, series,
                   warmup_s)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, optimize=True)
