"""Synthetic, deterministic movie posters for the offline demo.

No pretrained vision tower and no item images can be downloaded in hanorec's offline
setting, yet the multimodal pipeline (image tokens, the vision tower, HaRS's image
embeddings, NoDO's modality-bias argument) needs an image per item. So the demo renders
one: these posters are **synthetic** — they carry no information beyond the item's title,
year and genres, drawn as a genre-driven palette and motif plus the title and year as text.
They are a faithful test of the plumbing, not of visual recommendation quality.

Every poster is a pure function of ``(item_id, title, genres, size)``: the random layout
comes from a generator seeded by the SHA-256 of the item id, so renders are reproducible.
"""

from __future__ import annotations

import hashlib
import re
import textwrap
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# (background, foreground, accent) per genre; the first listed genre picks the palette.
PALETTES: dict[str, tuple[tuple[int, int, int], ...]] = {
    "Action": ((40, 10, 10), (220, 60, 30), (250, 200, 60)),
    "Adventure": ((20, 50, 30), (200, 150, 60), (240, 230, 180)),
    "Animation": ((250, 240, 120), (60, 140, 240), (240, 80, 140)),
    "Children's": ((170, 230, 250), (250, 170, 50), (90, 200, 90)),
    "Comedy": ((250, 220, 60), (230, 70, 60), (40, 40, 40)),
    "Crime": ((15, 15, 20), (180, 20, 30), (200, 200, 200)),
    "Documentary": ((225, 220, 205), (70, 70, 70), (160, 120, 60)),
    "Drama": ((40, 40, 80), (170, 170, 210), (230, 200, 150)),
    "Fantasy": ((50, 20, 80), (180, 110, 240), (250, 220, 120)),
    "Film-Noir": ((10, 10, 10), (230, 230, 230), (120, 120, 120)),
    "Horror": ((5, 0, 0), (140, 0, 0), (220, 220, 200)),
    "Musical": ((90, 10, 90), (250, 120, 200), (250, 230, 90)),
    "Mystery": ((20, 30, 50), (90, 130, 160), (220, 220, 160)),
    "Romance": ((250, 200, 210), (200, 40, 80), (255, 255, 255)),
    "Sci-Fi": ((5, 10, 40), (40, 220, 220), (200, 240, 255)),
    "Thriller": ((30, 30, 30), (230, 200, 0), (200, 30, 30)),
    "War": ((60, 60, 40), (150, 140, 90), (200, 60, 40)),
    "Western": ((200, 130, 60), (90, 40, 20), (250, 220, 150)),
}
DEFAULT_PALETTE = ((60, 60, 60), (170, 170, 170), (230, 230, 230))
MOTIFS = ("circles", "stripes", "triangles", "grid", "rays")
_YEAR = re.compile(r"^(.*?)\s*\((\d{4})\)\s*$")


def split_title(title: str) -> tuple[str, str]:
    """``"Toy Story (1995)"`` -> ``("Toy Story", "1995")``; no year -> ``(title, "")``."""
    match = _YEAR.match(title)
    return (match.group(1), match.group(2)) if match else (title, "")


def _seed(item_id: str) -> int:
    return int.from_bytes(hashlib.sha256(item_id.encode()).digest()[:8], "little")


def _motif(draw: ImageDraw.ImageDraw, kind: str, rng: np.random.Generator,
           size: tuple[int, int], colour: tuple[int, int, int]) -> None:
    width, height = size
    if kind == "circles":
        for _ in range(6):
            x, y, r = rng.integers(0,
                                   width), rng.integers(0,
                                                        height), rng.integers(max(2, width // 22),
                                                                              max(3, width // 3))
            draw.ellipse((x - r, y - r, x + r, y + r), outline=colour, width=4)
    elif kind == "stripes":
        step = int(rng.integers(14, 30))
        for x in range(-height, width, step):
            draw.line((x, 0, x + height, height), fill=colour, width=step // 3)
    elif kind == "triangles":
        for _ in range(5):
            pts = rng.integers(0, (width, height), size=(3, 2))
            draw.polygon([tuple(map(int, p)) for p in pts], fill=colour)
    elif kind == "grid":
        step = int(rng.integers(20, 40))
        for x in range(0, width, step):
            draw.line((x, 0, x, height), fill=colour, width=2)
        for y in range(0, height, step):
            draw.line((0, y, width, y), fill=colour, width=2)
    else:
        cx, cy = int(rng.integers(0, width)), int(rng.integers(0, height // 2))
        for angle in np.linspace(0, 2 * np.pi, 16, endpoint=False) + rng.random():
            draw.line((cx, cy, cx + 2 * height * np.cos(angle), cy + 2 * height * np.sin(angle)),
                      fill=colour, width=3)


def render_poster(item_id: str, title: str, genres: Sequence[str],
                  size: tuple[int, int] = (224, 336)) -> Image.Image:
    """Render one synthetic poster (see module docstring).

    The first known genre picks the palette and, with the id's seed, the motif; a second
    genre adds an accent band; the title (wrapped) and year are written at the bottom.
    """
    rng = np.random.default_rng(_seed(item_id))
    known = [g for g in genres if g in PALETTES]
    background, foreground, accent = PALETTES[known[0]] if known else DEFAULT_PALETTE
    image = Image.new("RGB", size, background)
    draw = ImageDraw.Draw(image)
    order = sorted(PALETTES)
    motif = MOTIFS[sum(order.index(g) for g in known[:2]) % len(MOTIFS)]
    _motif(draw, motif, rng, size, foreground)
    width, height = size
    if len(known) > 1:
        band = PALETTES[known[1]][1]
        draw.rectangle((0, int(height * 0.08), width, int(height * 0.14)), fill=band)
    name, year = split_title(title)
    font = ImageFont.load_default(size=max(10, width // 14))
    lines = textwrap.wrap(name, width=max(8, width // 12))[:3]
    box_top = height - 20 - 18 * (len(lines) + 1)
    draw.rectangle((0, box_top, width, height), fill=background)
    for row, text in enumerate(lines + [year]):
        draw.text((8, box_top + 6 + row * (width // 12)), text,
                  fill=accent if row < len(lines) else foreground, font=font)
    return image


def _render_chunk(jobs: list[tuple[str, str, list[str], str]], size: tuple[int, int]) -> int:
    for item_id, title, genres, path in jobs:
        render_poster(item_id, title, genres, size).save(path, format="PNG", compress_level=1)
    return len(jobs)


def render_posters(item_ids: Sequence[str], titles: Sequence[str],
                   genres: Sequence[Sequence[str]], out_dir: str | Path,
                   size: tuple[int, int] = (224, 336), workers: int = 2,
                   overwrite: bool = False) -> int:
    """Render ``<out_dir>/<item_id>.png`` for every item (skipping existing files).

    Returns:
        The number of posters written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(i, t, list(g), str(out / f"{i}.png")) for i, t, g in zip(item_ids, titles, genres)
            if overwrite or not (out / f"{i}.png").is_file()]
    if workers <= 1 or len(jobs) < 64:
        return _render_chunk(jobs, size)
    chunks = [jobs[i::workers] for i in range(workers)]
    with ProcessPoolExecutor(workers) as pool:
        return sum(pool.map(_render_chunk, chunks, [size] * workers))
