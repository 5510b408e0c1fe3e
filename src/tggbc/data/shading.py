"""Procedural colours: sky, road surface, and per-face box textures that make headings visible.

All functions take and return float32 RGB in [0, 1]. Box textures work on the entry point in the box
frame (x along the heading): vehicles show a dark windshield and white headlights at the front (+x)
and red tail lights at the back, so the detector can learn orientation from appearance.
"""

from __future__ import annotations

import numpy as np

from tggbc.data.scene import Lighting, Look, RoadLayout

_YELLOW_LINE = np.array([0.85, 0.70, 0.15], dtype=np.float32)
_WHITE_LINE = np.array([0.88, 0.88, 0.86], dtype=np.float32)
_TYRE = np.array([0.05, 0.05, 0.05], dtype=np.float32)


# A fixed 256 x 256 table of value noise, indexed by integer cell coordinates (wrapping). A table lookup
# is several times cheaper than hashing every pixel, and a fixed generator keeps images deterministic.
_NOISE = np.random.default_rng(20240917).random((256, 256), dtype=np.float32)


def _cell_noise(a: np.ndarray, b: np.ndarray, cell: float) -> np.ndarray:
    """Deterministic per-cell value noise in [0, 1) on a grid of `cell` metres, for points (a, b) [n]."""
    i = np.floor(a * (1.0 / cell)).astype(np.int64) & 255
    j = np.floor(b * (1.0 / cell)).astype(np.int64) & 255
    return _NOISE[i, j]


def _fraction(x: np.ndarray, period: float) -> np.ndarray:
    """Position within a period, in [0, 1): like np.mod(x, period) / period but several times faster."""
    scaled = x * np.float32(1.0 / period)
    return scaled - np.floor(scaled)


def sky_colour(blend: np.ndarray, lighting: Lighting) -> np.ndarray:
    """Sky gradient [k, 3] from the horizon (blend 0) to the zenith (blend 1); blend is [k]."""
    colour = lighting.sky_horizon[None, :] * (1 - blend[:, None]) + lighting.sky_zenith[None, :] * blend[:, None]
    return (colour * min(1.0, lighting.brightness + 0.1)).astype(np.float32)


# Ground materials, in the order of the palette built by ground_colour.
_ASPHALT, _SIDEWALK, _LOT, _GRASS, _BARE, _YELLOW, _WHITE = range(7)


def ground_colour(road_sd: np.ndarray, fog: np.ndarray, road: RoadLayout, lighting: Lighting) -> np.ndarray:
    """Road-surface colour [n, 3] at ground points given in road coordinates.

    Each point gets a material (asphalt, sidewalk, lot or grass verge, bare ground between buildings,
    yellow or white paint) and a brightness modulation; colour = palette[material] * brightness, then
    lighting and haze. Working on per-point scalars until the last step keeps this cheap.

    Args:
        road_sd: [n, 2] (s along the road, d to its left), metres.
        fog: [n] haze weight in [0, 1] (grows with distance from the camera).
    """
    s, d = road_sd[:, 0].astype(np.float32), road_sd[:, 1].astype(np.float32)
    abs_d = np.abs(d)
    fine = _cell_noise(s, d, 0.4)
    coarse = _cell_noise(s + 1000.0, d, 2.3)

    # Bands across the road: 0 road, 1 sidewalk, 2 verge, 3 beyond the verge.
    bounds = np.array([road.road_half_width, road.sidewalk_outer, road.verge_outer], dtype=np.float32)
    band = np.searchsorted(bounds, abs_d, side="right")
    verge_is_lot = np.where(d < 0, road.verge_is_lot[0], road.verge_is_lot[1])
    material = np.choose(band, [_ASPHALT, _SIDEWALK, np.where(verge_is_lot, _LOT, _GRASS), _BARE]).astype(np.int8)
    brightness = np.choose(
        band, [1.0 + 0.15 * (fine - 0.5) + 0.12 * (coarse - 0.5), 1.0 + 0.06 * (fine - 0.5), 0.0, 0.9 + 0.2 * fine]
    ).astype(np.float32)
    verge = band == 2
    grass_brightness = 0.75 + 0.35 * fine[verge] + 0.2 * (coarse[verge] - 0.5)
    brightness[verge] = np.where(verge_is_lot[verge], 0.9 + 0.2 * fine[verge], grass_brightness)
    walk = band == 1
    if walk.any():  # 1.5 m tiles with dark seams and a bright kerb
        across = abs_d[walk] - road.road_half_width
        seam = (_fraction(s[walk], 1.5) < 0.05 / 1.5) | (_fraction(across, 1.5) < 0.05 / 1.5)
        brightness[walk] += 0.18 * (across < 0.25) - 0.18 * seam

    # Lane markings: yellow double centre line, dashed white lane separators, solid white edge lines.
    lanes_edge = road.lanes_per_direction * road.lane_width
    material[(abs_d > 0.07) & (abs_d < 0.22)] = _YELLOW
    white = np.abs(abs_d - lanes_edge) < 0.08
    if road.lanes_per_direction > 1:
        in_lane = _fraction(abs_d, road.lane_width)
        near_separator = np.minimum(in_lane, 1.0 - in_lane) < 0.075 / road.lane_width
        white |= near_separator & (abs_d > 1.0) & (abs_d < lanes_edge - 1) & (_fraction(s, 9.0) < 1.0 / 3.0)
    material[white] = _WHITE
    brightness[material >= _YELLOW] = 1.0

    palette = np.array(
        [
            [road.asphalt] * 3,
            [road.sidewalk] * 3,
            road.lot_rgb,
            road.grass_rgb,
            [0.5, 0.48, 0.45],
            _YELLOW_LINE,
            _WHITE_LINE,
        ],
        dtype=np.float32,
    )
    light = lighting.brightness * (0.8 + 0.2 * lighting.sun_direction[2])
    scale = brightness * (light * (1.0 - fog))
    haze = lighting.haze.astype(np.float32)[None, :] * fog[:, None]
    return np.take(palette, material, axis=0) * scale[:, None] + haze


def _box_fractions(local_point: np.ndarray, half: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Entry point as fractions in [0, 1] along length (0 = back), width (0 = right) and height (0 = ground)."""
    fractions = (local_point / half[None, :] + 1.0) * 0.5
    fractions = np.clip(fractions, 0.0, 1.0)
    return fractions[:, 0], fractions[:, 1], fractions[:, 2]


def box_colour(
    look: Look, local_point: np.ndarray, face_axis: np.ndarray, face_sign: np.ndarray, half: np.ndarray
) -> np.ndarray:
    """Unlit texture colour [n, 3] of the entry points of n rays on one box.

    Args:
        look: the box's appearance.
        local_point: [n, 3] entry points in the box frame.
        face_axis, face_sign: [n] entered face (see raycast.BoxHits).
        half: [3] half length, width, height.
    """
    p = look.palette.astype(np.float32)
    fx, fy, fz = _box_fractions(local_point, half)
    front = (face_axis == 0) & (face_sign > 0)
    back = (face_axis == 0) & (face_sign < 0)
    side = face_axis == 1
    top = (face_axis == 2) & (face_sign > 0)
    colour = np.repeat(p[0][None, :], len(fx), axis=0)

    def paint(mask: np.ndarray, rgb) -> None:
        colour[mask] = rgb

    kind = look.kind
    if kind in ("car", "truck", "bus", "trailer", "construction"):
        wheel = side & (fz < 0.22) & ((np.abs(fx - 0.17) < 0.08) | (np.abs(fx - 0.83) < 0.08))
        lamp_band = (fz > 0.35) & (fz < 0.5) & ((fy < 0.2) | (fy > 0.8))
        if kind == "car":
            paint(side & (fz > 0.62) & (fz < 0.92) & (fx > 0.22) & (fx < 0.78), p[1])
            paint(front & (fz > 0.60) & (fz < 0.95) & (fy > 0.08) & (fy < 0.92), p[1])
            paint(back & (fz > 0.65) & (fz < 0.92) & (fy > 0.12) & (fy < 0.88), p[1])
            paint(top & (fx > 0.25) & (fx < 0.7), p[0] * 0.8)
        elif kind == "truck":
            cab = fx > 0.72  # the cab is the front 28% of the length
            paint(cab & ~back, p[3])
            paint(side & cab & (fz > 0.6) & (fz < 0.85) & (fx > 0.8) & (fx < 0.95), p[1])
            paint(front & (fz > 0.55) & (fz < 0.85) & (fy > 0.08) & (fy < 0.92), p[1])
            paint(side & (fz < 0.25), p[0] * 0.4)
        elif kind == "bus":
            paint(side & (fz > 0.45) & (fz < 0.85) & (fx > 0.04) & (fx < 0.96), p[1])
            paint(front & (fz > 0.3) & (fz < 0.92) & (fy > 0.06) & (fy < 0.94), p[1])
            paint(back & (fz > 0.6) & (fz < 0.85) & (fy > 0.2) & (fy < 0.8), p[1])
        elif kind == "trailer":
            paint(fz < 0.22, p[1])
            paint(front, p[3])
            paint(side & (_fraction(fx, 1.0 / 12.0) < 0.06) & (fz > 0.22), p[0] * 0.85)  # panel seams
        elif kind == "construction":
            paint((fz < 0.3), p[1] * 2.0)  # tracks / chassis
            cab = (fx > 0.35) & (fx < 0.75) & (fz > 0.55)
            paint(cab & (side | front | back) & (_fraction(fx, 1.0 / 6.0) > 0.15), p[1])
            paint(top & (fx > 0.75), p[0] * 0.7)
        paint(wheel, _TYRE)
        paint(front & lamp_band, p[3] if kind != "trailer" else p[2])
        paint(back & lamp_band, p[2])
    elif kind == "pedestrian":
        paint(fz < 0.47, p[1])  # trousers
        head = fz > 0.86
        paint(head, p[2])
        paint(head & (back | (top & (fx < 0.6))), p[3])  # hair at the back and on top: the face points forward
        paint(side & (fz > 0.5) & (fz < 0.82) & (fx > 0.35) & (fx < 0.65), p[0] * 0.8)  # arms
    elif kind == "cycle":
        has_rider = p[3][0] > 0.5
        tyre_x = np.minimum(np.abs(fx - 0.2), np.abs(fx - 0.8))
        ring = side & (fz < 0.5) & (np.hypot(tyre_x * 3.5, fz - 0.25) < 0.25)
        paint(ring, _TYRE)
        if has_rider:
            paint((fz > 0.5) & (fx > 0.25) & (fx < 0.7), p[1])
            paint((fz > 0.88) & (fx > 0.35) & (fx < 0.6), np.array([0.15, 0.15, 0.18]))  # helmet
        paint(front & (fz > 0.55) & (fz < 0.7), np.array([0.95, 0.95, 0.8]))
    elif kind == "cone":
        paint((fz > 0.45) & (fz < 0.65), p[1])
        paint(fz < 0.06, p[2])  # base
    elif kind == "barrier":
        stripes = _fraction(np.floor(fy * 6.0 + fz * 2.0), 2.0) > 0.25  # odd stripe index
        paint(stripes, p[1])
        paint(fz < 0.1, p[2])
    elif kind == "building":
        floor_height = float(p[3][0])
        storey = _fraction(fz * 2.0 * half[2], floor_height)
        horizontal = np.where(face_axis == 0, fy * 2.0 * half[1], fx * 2.0 * half[0])
        window = (storey > 0.3) & (storey < 0.75) & (_fraction(horizontal, 2.6) > 0.5 / 2.6) & (face_axis != 2)
        paint(window & (fz * 2.0 * half[2] > 0.5), p[1])
        paint(face_axis == 2, p[2])
    else:
        raise ValueError(f"unknown look kind {kind!r}")
    return colour


def lit_colour(
    texture: np.ndarray, face_axis: np.ndarray, face_sign: np.ndarray, yaw: float, lighting: Lighting
) -> np.ndarray:
    """Apply Lambert shading with ambient light, per face. Normals are rotated by the box yaw into the
    frame of `lighting.sun_direction`. Returns [n, 3]."""
    normals_local = np.zeros((len(face_axis), 3), dtype=np.float32)
    normals_local[np.arange(len(face_axis)), face_axis] = face_sign
    c, s = np.cos(yaw), np.sin(yaw)
    normals = np.stack(
        [
            c * normals_local[:, 0] - s * normals_local[:, 1],
            s * normals_local[:, 0] + c * normals_local[:, 1],
            normals_local[:, 2],
        ],
        axis=1,
    )
    lambert = np.clip(normals @ lighting.sun_direction.astype(np.float32), 0.0, 1.0)
    shade = lighting.brightness * (0.45 + 0.55 * lambert)
    return texture * shade[:, None]
