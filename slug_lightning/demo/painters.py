"""Drawing the demo world's images: vectorised numpy masks on a 2x supersampled canvas, coordinates in
[0, 1].

:func:`render` paints one image (a background scene, a person and/or an object, pixel noise) from a random
generator the caller seeds, and :func:`encode_png` encodes it; the same generator state always gives the same
bytes. A person is a head-and-shoulders portrait of their attributes
(:data:`~slug_lightning.demo.vocabulary.ATTRIBUTES`); every object kind (:data:`OBJECT_PAINTERS`) and every
scene (:data:`SCENE_PAINTERS`) has its own painter. A change here that changes a pixel changes the worlds
written: bump ``GENERATOR_VERSION`` in :mod:`slug_lightning.demo.world` with it.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from functools import lru_cache

import numpy as np
from PIL import Image

from slug_lightning.demo.vocabulary import ATTRIBUTES

HAT_RGB = (52, 48, 62)
EYE_RGB = (20, 20, 30)
MOUTH_RGB = (150, 50, 50)


def encode_png(pixels: np.ndarray) -> bytes:
    """``pixels`` (uint8 RGB) as PNG bytes, always encoded the same way."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


@lru_cache(maxsize=4)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size
    return np.meshgrid(coords, coords)  # X varies along columns, Y along rows (down)


def render(
    rng: np.random.Generator, size: int, spec: dict, person: str | None, kind: str | None, scene: str
) -> np.ndarray:
    """One uint8 RGB image of ``person`` and/or object ``kind`` in front of ``scene``."""
    big = size * 2
    X, Y = _grid(big)
    canvas = np.empty((big, big, 3), dtype=np.float32)
    SCENE_PAINTERS[scene](canvas, X, Y, rng)
    if person is not None:
        # With an object the person stands left of it, so both stay visible.
        cx = rng.uniform(0.28, 0.42) if kind else rng.uniform(0.36, 0.64)
        _paint_person(canvas, X, Y, spec["people"][person], cx, rng.uniform(0.0, 0.12), rng.uniform(0.88, 1.08), rng)
    if kind is not None:
        if person is not None:
            x, y, r = rng.uniform(0.72, 0.8), rng.uniform(0.62, 0.76), rng.uniform(0.16, 0.2)
        else:
            x, y, r = rng.uniform(0.38, 0.62), rng.uniform(0.38, 0.62), rng.uniform(0.26, 0.34)
        OBJECT_PAINTERS[kind](canvas, X, Y, x, y, r, rng)
    # Averaging the 2x2 blocks anti-aliases every edge (strided sums are much faster than reshape+mean).
    small = (canvas[0::2, 0::2] + canvas[1::2, 0::2] + canvas[0::2, 1::2] + canvas[1::2, 1::2]) * 0.25
    small += rng.normal(0.0, 6.0, small.shape).astype(np.float32)
    return np.clip(small, 0, 255).round().astype(np.uint8)


def _jitter(rgb: Sequence[float], rng: np.random.Generator, amount: float = 14.0) -> np.ndarray:
    return np.clip(np.asarray(rgb, dtype=np.float32) + rng.uniform(-amount, amount, 3), 0, 255)


def _ellipse(X, Y, cx, cy, rx, ry, power: float = 2.0) -> np.ndarray:
    return (np.abs((X - cx) / rx) ** power + np.abs((Y - cy) / ry) ** power) < 1.0


def _rect(X, Y, x0, y0, x1, y1) -> np.ndarray:
    return (X >= x0) & (X < x1) & (Y >= y0) & (Y < y1)


def _segment(X, Y, x0, y0, x1, y1, width) -> np.ndarray:
    """Pixels within ``width / 2`` of the segment (x0, y0)-(x1, y1)."""
    dx, dy = x1 - x0, y1 - y0
    t = np.clip(((X - x0) * dx + (Y - y0) * dy) / (dx * dx + dy * dy), 0.0, 1.0)
    return (X - x0 - t * dx) ** 2 + (Y - y0 - t * dy) ** 2 < (width / 2) ** 2


def _polygon(X, Y, points: Sequence[tuple[float, float]]) -> np.ndarray:
    """Inside of a convex polygon given counter-clockwise in image coordinates (y down)."""
    inside = np.ones(X.shape, dtype=bool)
    for (x0, y0), (x1, y1) in zip(points, points[1:] + points[:1]):
        inside &= (x1 - x0) * (Y - y0) - (y1 - y0) * (X - x0) <= 0
    return inside


# --- people ---------------------------------------------------------------------------------------


def _paint_person(
    canvas, X, Y, attrs: dict[str, str], cx: float, top: float, scale: float, rng: np.random.Generator
) -> None:
    """A head-and-shoulders portrait; ``top`` is where the tallest hair or hat may start."""
    r = 0.19 * scale
    hx, hy = cx, top + 1.7 * r
    skin = _jitter(ATTRIBUTES["skin"][attrs["skin"]], rng, 10)
    hair = _jitter(ATTRIBUTES["hair_colour"][attrs["hair_colour"]], rng, 10)
    shirt = _jitter(ATTRIBUTES["shirt"][attrs["shirt"]], rng, 12)
    rx, ry, power = {"round": (1.05, 1.0, 2.0), "oval": (0.72, 1.15, 2.0), "square": (1.0, 1.0, 6.0)}[attrs["face"]]
    rx, ry = rx * r, ry * r
    style = attrs["hair_style"]

    # Back to front: hair behind the head, shoulders, neck, face, hair on top, accessories.
    if style == "long":
        canvas[_rect(X, Y, hx - 1.18 * rx, hy - 0.3 * ry, hx + 1.18 * rx, hy + 1.55 * r)] = hair
    elif style == "afro":
        canvas[_ellipse(X, Y, hx, hy - 0.25 * r, 1.5 * r, 1.35 * r)] = hair
    shoulders_y = hy + 1.75 * r
    torso = _ellipse(X, Y, cx, shoulders_y + 0.3 * r, 1.75 * r, 0.75 * r) | _rect(
        X, Y, cx - 1.75 * r, shoulders_y + 0.3 * r, cx + 1.75 * r, 2.0
    )
    canvas[torso] = shirt
    canvas[_rect(X, Y, hx - 0.33 * r, hy, hx + 0.33 * r, shoulders_y)] = skin * 0.9
    face = _ellipse(X, Y, hx, hy, rx, ry, power)
    canvas[face] = skin
    if style in ("short", "long", "bun"):
        cap = _ellipse(X, Y, hx, hy - 0.06 * r, rx * 1.1, ry * 1.1, power) & (Y < hy - 0.38 * ry)
        canvas[cap] = hair
    if style == "bun":
        canvas[_ellipse(X, Y, hx, hy - ry - 0.38 * r, 0.58 * r, 0.48 * r)] = hair
    eye_y, eye_dx = hy - 0.02 * r, 0.4 * rx
    accessory = attrs["accessory"]
    if accessory == "beard":
        canvas[face & (Y > hy + 0.3 * ry)] = hair
    for side in (-1, 1):
        canvas[_ellipse(X, Y, hx + side * eye_dx, eye_y, 0.13 * r, 0.13 * r)] = EYE_RGB
    if accessory == "glasses":
        for side in (-1, 1):
            d2 = (X - hx - side * eye_dx) ** 2 + (Y - eye_y) ** 2
            canvas[(d2 < (0.34 * r) ** 2) & (d2 > (0.2 * r) ** 2)] = EYE_RGB
        canvas[_rect(X, Y, hx - eye_dx + 0.3 * r, eye_y - 0.05 * r, hx + eye_dx - 0.3 * r, eye_y + 0.05 * r)] = EYE_RGB
    elif accessory == "hat":
        brim_y = hy - 0.62 * ry
        canvas[_rect(X, Y, hx - 1.45 * rx, brim_y - 0.12 * r, hx + 1.45 * rx, brim_y + 0.12 * r)] = HAT_RGB
        canvas[_rect(X, Y, hx - 0.85 * rx, brim_y - 0.95 * r, hx + 0.85 * rx, brim_y)] = HAT_RGB
    elif accessory != "beard":
        canvas[_rect(X, Y, hx - 0.25 * rx, hy + 0.5 * ry, hx + 0.25 * rx, hy + 0.6 * ry)] = MOUTH_RGB


# --- objects: each kind has its own shape, colours and pattern -------------------------------------


def _teapot(canvas, X, Y, x, y, r, rng):
    body = _jitter((150, 110, 210), rng)
    canvas[
        _ellipse(X, Y, x + 0.75 * r, y - 0.35 * r, 0.2 * r, 0.2 * r)
        | _segment(X, Y, x + 0.5 * r, y, x + 0.95 * r, y - 0.5 * r, 0.18 * r)
    ] = body
    ring = (X - x + 0.75 * r) ** 2 + (Y - y) ** 2
    canvas[(ring < (0.35 * r) ** 2) & (ring > (0.2 * r) ** 2)] = body * 0.7
    canvas[_ellipse(X, Y, x, y, 0.62 * r, 0.48 * r)] = body
    canvas[_ellipse(X, Y, x, y - 0.55 * r, 0.15 * r, 0.12 * r)] = body * 0.7
    canvas[_rect(X, Y, x - 0.6 * r, y - 0.05 * r, x + 0.6 * r, y + 0.08 * r)] = (245, 240, 220)


def _umbrella(canvas, X, Y, x, y, r, rng):
    canopy = _ellipse(X, Y, x, y, r, 0.75 * r) & (Y < y)
    stripes = (np.floor(np.arctan2(Y - y, X - x) / (np.pi / 6)) % 2).astype(bool)
    canvas[canopy & stripes] = _jitter((30, 60, 200), rng)
    canvas[canopy & ~stripes] = _jitter((245, 245, 240), rng, 8)
    canvas[_rect(X, Y, x - 0.05 * r, y, x + 0.05 * r, y + 0.85 * r)] = (60, 40, 30)
    hook = (X - x + 0.15 * r) ** 2 + (Y - y - 0.85 * r) ** 2
    canvas[(hook < (0.2 * r) ** 2) & (hook > (0.1 * r) ** 2) & (Y > y + 0.85 * r)] = (60, 40, 30)


def _clock(canvas, X, Y, x, y, r, rng):
    d2 = (X - x) ** 2 + (Y - y) ** 2
    canvas[d2 < (0.8 * r) ** 2] = _jitter((30, 30, 40), rng, 8)
    canvas[d2 < (0.68 * r) ** 2] = _jitter((250, 250, 240), rng, 5)
    angle = rng.uniform(0, 2 * np.pi)
    canvas[_segment(X, Y, x, y, x + 0.5 * r * np.cos(angle), y + 0.5 * r * np.sin(angle), 0.1 * r)] = (30, 30, 40)
    canvas[_segment(X, Y, x, y, x, y - 0.4 * r, 0.12 * r)] = (200, 30, 30)


def _cactus(canvas, X, Y, x, y, r, rng):
    green = _jitter((40, 140, 60), rng)
    canvas[_rect(X, Y, x - 0.4 * r, y + 0.55 * r, x + 0.4 * r, y + 0.95 * r)] = _jitter((190, 100, 60), rng)
    canvas[_ellipse(X, Y, x, y - 0.1 * r, 0.2 * r, 0.75 * r)] = green
    canvas[
        _rect(X, Y, x - 0.55 * r, y - 0.05 * r, x, y + 0.08 * r)
        | _ellipse(X, Y, x - 0.55 * r, y - 0.25 * r, 0.1 * r, 0.3 * r)
    ] = green
    canvas[
        _rect(X, Y, x, y + 0.1 * r, x + 0.55 * r, y + 0.22 * r)
        | _ellipse(X, Y, x + 0.55 * r, y - 0.05 * r, 0.1 * r, 0.3 * r)
    ] = green


def _kite(canvas, X, Y, x, y, r, rng):
    diamond = _polygon(X, Y, [(x, y - r), (x - 0.6 * r, y - 0.1 * r), (x, y + 0.7 * r), (x + 0.6 * r, y - 0.1 * r)])
    upper = (X - x) * (Y - y + 0.1 * r) > 0
    canvas[diamond & upper] = _jitter((250, 210, 30), rng)
    canvas[diamond & ~upper] = _jitter((30, 90, 220), rng)
    canvas[_segment(X, Y, x, y + 0.7 * r, x + 0.3 * r, y + r, 0.06 * r)] = (40, 40, 40)


def _balloon(canvas, X, Y, x, y, r, rng):
    colour = _jitter((230, 40, 90), rng)
    canvas[_segment(X, Y, x, y + 0.5 * r, x - 0.15 * r, y + r, 0.06 * r)] = (70, 70, 70)
    canvas[_ellipse(X, Y, x, y - 0.2 * r, 0.55 * r, 0.7 * r)] = colour
    canvas[_ellipse(X, Y, x - 0.2 * r, y - 0.45 * r, 0.12 * r, 0.16 * r)] = np.minimum(colour + 90, 255)


def _lamp(canvas, X, Y, x, y, r, rng):
    canvas[_rect(X, Y, x - 0.05 * r, y - 0.2 * r, x + 0.05 * r, y + 0.8 * r)] = (90, 90, 90)
    canvas[_rect(X, Y, x - 0.45 * r, y + 0.8 * r, x + 0.45 * r, y + 0.95 * r)] = (60, 60, 60)
    shade = _polygon(
        X,
        Y,
        [
            (x - 0.3 * r, y - 0.8 * r),
            (x - 0.65 * r, y - 0.15 * r),
            (x + 0.65 * r, y - 0.15 * r),
            (x + 0.3 * r, y - 0.8 * r),
        ],
    )
    canvas[shade] = _jitter((250, 230, 120), rng)


def _mushroom(canvas, X, Y, x, y, r, rng):
    canvas[_rect(X, Y, x - 0.2 * r, y - 0.1 * r, x + 0.2 * r, y + 0.75 * r)] = _jitter((240, 225, 195), rng, 8)
    cap = _ellipse(X, Y, x, y, 0.85 * r, 0.7 * r) & (Y < y)
    canvas[cap] = _jitter((210, 30, 30), rng)
    for dx, dy in ((-0.4, -0.2), (0.05, -0.5), (0.45, -0.25)):
        canvas[cap & _ellipse(X, Y, x + dx * r, y + dy * r, 0.12 * r, 0.1 * r)] = (250, 250, 250)


def _donut(canvas, X, Y, x, y, r, rng):
    d2 = ((X - x) ** 2 + ((Y - y) / 0.85) ** 2) / r**2
    canvas[(d2 < 0.6) & (d2 > 0.06)] = _jitter((200, 140, 70), rng)
    icing = (d2 < 0.45) & (d2 > 0.1)
    canvas[icing] = _jitter((245, 140, 190), rng)
    sprinkles = icing & (np.sin(X * 97.0) * np.sin(Y * 83.0) > 0.8)
    canvas[sprinkles] = (60, 180, 230)


def _traffic_cone(canvas, X, Y, x, y, r, rng):
    cone = _polygon(X, Y, [(x, y - r), (x - 0.55 * r, y + 0.7 * r), (x + 0.55 * r, y + 0.7 * r)])
    canvas[cone] = _jitter((250, 110, 20), rng)
    canvas[cone & (Y > y - 0.05 * r) & (Y < y + 0.2 * r)] = (250, 250, 250)
    canvas[_rect(X, Y, x - 0.75 * r, y + 0.7 * r, x + 0.75 * r, y + 0.85 * r)] = (250, 110, 20)


def _starfish(canvas, X, Y, x, y, r, rng):
    angle = np.arctan2(Y - y, X - x) + rng.uniform(0, 2 * np.pi / 5)
    radius = np.sqrt((X - x) ** 2 + (Y - y) ** 2) / r
    star = radius < 0.4 + 0.5 * np.abs(np.cos(2.5 * angle)) ** 3
    canvas[star] = _jitter((240, 150, 60), rng)
    canvas[star & (np.sin(X * 120.0) * np.sin(Y * 120.0) > 0.7)] = (170, 70, 30)


def _bell(canvas, X, Y, x, y, r, rng):
    gold = _jitter((220, 180, 40), rng)
    canvas[_ellipse(X, Y, x, y - 0.2 * r, 0.45 * r, 0.55 * r) & (Y < y + 0.1 * r)] = gold
    canvas[
        _polygon(
            X,
            Y,
            [
                (x - 0.45 * r, y - 0.1 * r),
                (x - 0.75 * r, y + 0.6 * r),
                (x + 0.75 * r, y + 0.6 * r),
                (x + 0.45 * r, y - 0.1 * r),
            ],
        )
    ] = gold
    canvas[_ellipse(X, Y, x, y + 0.7 * r, 0.15 * r, 0.15 * r)] = (120, 90, 30)


def _anchor(canvas, X, Y, x, y, r, rng):
    steel = _jitter((40, 40, 45), rng)
    canvas[_rect(X, Y, x - 0.08 * r, y - 0.7 * r, x + 0.08 * r, y + 0.7 * r)] = steel
    canvas[_rect(X, Y, x - 0.4 * r, y - 0.45 * r, x + 0.4 * r, y - 0.32 * r)] = steel
    ring = (X - x) ** 2 + (Y - y + 0.82 * r) ** 2
    canvas[(ring < (0.2 * r) ** 2) & (ring > (0.1 * r) ** 2)] = steel
    arc = (X - x) ** 2 + (Y - y - 0.1 * r) ** 2
    canvas[(arc < (0.7 * r) ** 2) & (arc > (0.55 * r) ** 2) & (Y > y + 0.1 * r)] = steel


OBJECT_PAINTERS: dict[str, Callable] = {
    "teapot": _teapot,
    "umbrella": _umbrella,
    "clock": _clock,
    "cactus": _cactus,
    "kite": _kite,
    "balloon": _balloon,
    "lamp": _lamp,
    "mushroom": _mushroom,
    "donut": _donut,
    "traffic cone": _traffic_cone,
    "starfish": _starfish,
    "bell": _bell,
    "anchor": _anchor,
}


# --- scenes ---------------------------------------------------------------------------------------


def _sky_and_ground(canvas, Y, sky, ground, horizon) -> None:
    canvas[:] = np.where((Y < horizon)[..., None], sky, ground)


def _beach(canvas, X, Y, rng):
    h = rng.uniform(0.4, 0.6)
    _sky_and_ground(canvas, Y, _jitter((140, 200, 245), rng), _jitter((235, 215, 160), rng), h)
    canvas[(Y >= h) & (Y < h + 0.08)] = _jitter((40, 120, 190), rng)


def _forest(canvas, X, Y, rng):
    canvas[:] = _jitter((40, 95, 50), rng)
    trunks = np.sin(X * rng.uniform(25, 40) + rng.uniform(0, 6)) > 0.75
    canvas[trunks] = _jitter((90, 60, 35), rng)
    canvas[np.sin(X * 31.0 + Y * 17.0) * np.sin(Y * 23.0 - X * 11.0) > 0.6] = _jitter((70, 140, 70), rng)


def _city(canvas, X, Y, rng):
    canvas[:] = _jitter((150, 170, 190), rng)
    heights = rng.uniform(0.2, 0.6, 6)
    column = np.minimum((X * 6).astype(int), 5)
    building = Y > heights[column]
    canvas[building] = _jitter((95, 95, 105), rng)
    windows = building & (np.sin(X * 90.0) > 0.3) & (np.sin(Y * 90.0) > 0.3)
    canvas[windows] = _jitter((235, 220, 140), rng)


def _snow(canvas, X, Y, rng):
    _sky_and_ground(canvas, Y, _jitter((205, 215, 230), rng), _jitter((245, 248, 252), rng, 5), rng.uniform(0.45, 0.65))
    flakes = rng.random(X.shape) < 0.03
    canvas[flakes] = (255, 255, 255)


def _park(canvas, X, Y, rng):
    _sky_and_ground(canvas, Y, _jitter((150, 205, 240), rng), _jitter((90, 170, 70), rng), rng.uniform(0.45, 0.65))
    tx = rng.choice([rng.uniform(0.05, 0.2), rng.uniform(0.8, 0.95)])
    canvas[_ellipse(X, Y, tx, 0.3, 0.12, 0.15)] = _jitter((40, 120, 45), rng)


def _studio(canvas, X, Y, rng):
    base = rng.uniform(60, 230, 3).astype(np.float32)
    shade = 1.0 - 0.35 * ((X - 0.5) ** 2 + (Y - 0.5) ** 2)
    canvas[:] = base * shade[..., None]


def _night(canvas, X, Y, rng):
    canvas[:] = _jitter((20, 25, 60), rng, 10)
    canvas[rng.random(X.shape) < 0.02] = (250, 250, 210)
    canvas[_ellipse(X, Y, rng.uniform(0.1, 0.9), rng.uniform(0.05, 0.2), 0.07, 0.07)] = (240, 240, 200)


def _room(canvas, X, Y, rng):
    _sky_and_ground(canvas, Y, _jitter((225, 205, 170), rng), _jitter((140, 95, 60), rng), rng.uniform(0.6, 0.75))
    canvas[(np.sin(X * 60.0) > 0.9) & (Y < 0.6)] = _jitter((205, 185, 150), rng)


SCENE_PAINTERS: dict[str, Callable] = {
    "beach": _beach,
    "forest": _forest,
    "city": _city,
    "snow": _snow,
    "park": _park,
    "studio": _studio,
    "night": _night,
    "room": _room,
}
