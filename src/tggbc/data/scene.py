"""Random driving scenes: a straight road with lanes, sidewalks, verges and buildings, populated with
objects of the ten nuScenes detection classes moving at constant velocity.

Everything is sampled in a road frame (s along the road, d to its left) and then placed in the global
frame by the road's origin and heading, so each scene has its own global orientation. Traffic drives
on the right: lanes with d < 0 go towards +s, lanes with d > 0 towards -s. The ego drives in a +s lane.
No two boxes (nor a box and the ego) overlap at any frame: every candidate is checked against all
placed boxes with a separating-axis test on their footprints at every frame time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tggbc.data.classes import CATEGORY_SIZE_WLH
from tggbc.data.transforms import rotate_2d

FRAME_INTERVAL_S = 0.5  # nuScenes keyframes come at 2 Hz
ANNOTATION_RADIUS_M = 60.0  # objects never this close to the ego are dropped from the scene
EGO_SIZE_WLH = (1.9, 4.8, 1.6)
EGO_CENTER_OFFSET_X = 1.4  # ego origin sits near the rear axle; the body centre is ahead of it


@dataclass(frozen=True)
class RoadLayout:
    """Where the road is and how its surface looks. Lengths in metres, colours RGB in [0, 1]."""

    origin_xy: np.ndarray  # [2] global position of the road frame origin
    yaw: float  # global heading of the +s axis
    lane_width: float
    lanes_per_direction: int
    parking_width: float  # 0 when the road has no parking strips
    sidewalk_width: float
    verge_depth: float  # width of the grass/lot band between sidewalk and buildings
    verge_is_lot: tuple[bool, bool]  # (right side d < 0, left side d > 0)
    asphalt: float  # grey level of the road
    sidewalk: float  # grey level of the sidewalk
    grass_rgb: tuple[float, float, float]
    lot_rgb: tuple[float, float, float]

    @property
    def road_half_width(self) -> float:
        return self.lanes_per_direction * self.lane_width + self.parking_width

    @property
    def sidewalk_outer(self) -> float:
        return self.road_half_width + self.sidewalk_width

    @property
    def verge_outer(self) -> float:
        return self.sidewalk_outer + self.verge_depth


@dataclass(frozen=True)
class Lighting:
    """Sun and sky of a scene."""

    sun_direction: np.ndarray  # [3] unit vector towards the sun, global frame
    brightness: float
    sky_horizon: np.ndarray  # [3] RGB
    sky_zenith: np.ndarray  # [3] RGB
    haze: np.ndarray  # [3] RGB the ground fades to with distance


@dataclass(frozen=True)
class Look:
    """Appearance of one box: a shading `kind` and a palette [4, 3] of RGB colours it uses."""

    kind: str  # car, truck, bus, trailer, construction, pedestrian, cycle, cone, barrier, building
    palette: np.ndarray


@dataclass
class Scene:
    """One sampled scene. N objects; arrays are float64 in the global frame.

    categories[i] is a nuScenes category name, or '' for unannotated scenery (buildings).
    """

    road: RoadLayout
    lighting: Lighting
    frame_times: np.ndarray  # [F] seconds since the first frame
    ego_start_xy: np.ndarray  # [2]
    ego_velocity_xy: np.ndarray  # [2]
    ego_yaw: float
    categories: list[str]
    attributes: list[str]
    sizes_wlh: np.ndarray  # [N, 3]
    start_xy: np.ndarray  # [N, 2] box centre at frame 0
    velocities_xy: np.ndarray  # [N, 2]
    yaws: np.ndarray  # [N]
    looks: list[Look]

    @property
    def num_frames(self) -> int:
        return len(self.frame_times)

    @property
    def annotated(self) -> np.ndarray:
        """[N] bool: which objects get sample_annotations."""
        return np.array([bool(c) for c in self.categories], dtype=bool)

    def centers(self, frame: int) -> np.ndarray:
        """Box centres [N, 3] at `frame`; boxes stand on the ground (z = 0)."""
        xy = self.start_xy + self.velocities_xy * self.frame_times[frame]
        return np.concatenate([xy, self.sizes_wlh[:, 2:3] / 2.0], axis=1)

    def ego_pose(self, frame: int) -> tuple[np.ndarray, float]:
        """Ego position [3] (z = 0) and heading at `frame`."""
        xy = self.ego_start_xy + self.ego_velocity_xy * self.frame_times[frame]
        return np.array([xy[0], xy[1], 0.0]), self.ego_yaw


# --------------------------------------------------------------------------------------------------
# Appearance palettes. Real-world-ish distributions: most cars are white, black, grey or silver.

_CAR_COLOURS = np.array(
    [
        [0.92, 0.92, 0.90], [0.08, 0.08, 0.09], [0.55, 0.56, 0.58], [0.75, 0.76, 0.78], [0.62, 0.08, 0.07],
        [0.10, 0.22, 0.55], [0.05, 0.10, 0.25], [0.12, 0.35, 0.18], [0.78, 0.70, 0.55], [0.90, 0.75, 0.10],
    ]
)  # fmt: skip
_CAR_WEIGHTS = np.array([0.22, 0.18, 0.15, 0.13, 0.09, 0.07, 0.05, 0.04, 0.04, 0.03])
_CLOTHES = np.array(
    [
        [0.10, 0.10, 0.12], [0.85, 0.85, 0.85], [0.60, 0.12, 0.12], [0.15, 0.25, 0.55], [0.20, 0.45, 0.25],
        [0.85, 0.65, 0.15], [0.45, 0.30, 0.20], [0.55, 0.55, 0.60], [0.70, 0.35, 0.55], [0.15, 0.55, 0.65],
    ]
)  # fmt: skip
_SKIN = np.array([[0.95, 0.80, 0.68], [0.85, 0.65, 0.50], [0.62, 0.44, 0.32], [0.40, 0.27, 0.20]])
_FACADES = np.array(
    [[0.80, 0.75, 0.65], [0.65, 0.35, 0.28], [0.60, 0.60, 0.62], [0.88, 0.86, 0.82], [0.70, 0.62, 0.48]]
)


def _jitter(rng: np.random.Generator, colour, amount: float = 0.05) -> np.ndarray:
    return np.clip(np.asarray(colour, dtype=np.float64) + rng.normal(0.0, amount, 3), 0.0, 1.0)


def _pick(rng: np.random.Generator, colours: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    return colours[rng.choice(len(colours), p=weights)]


def _look_for(category: str, attribute: str, rng: np.random.Generator) -> Look:
    """Sample the appearance of an object of `category`."""
    if category == "vehicle.car":
        body = _jitter(rng, _pick(rng, _CAR_COLOURS, _CAR_WEIGHTS), 0.03)
        return Look("car", np.stack([body, [0.08, 0.10, 0.13], [0.85, 0.10, 0.08], [0.95, 0.95, 0.85]]))
    if category == "vehicle.truck":
        cab = _jitter(rng, _pick(rng, _CAR_COLOURS), 0.05)
        cargo = _jitter(rng, rng.choice([[0.9, 0.9, 0.9], [0.6, 0.6, 0.6], [0.2, 0.35, 0.6], [0.7, 0.2, 0.1]]))
        return Look("truck", np.stack([cargo, [0.08, 0.10, 0.13], [0.85, 0.10, 0.08], cab]))
    if category.startswith("vehicle.bus"):
        body = _jitter(rng, rng.choice([[0.92, 0.92, 0.90], [0.80, 0.12, 0.10], [0.15, 0.35, 0.70], [0.95, 0.75, 0.1]]))
        return Look("bus", np.stack([body, [0.07, 0.09, 0.12], [0.85, 0.10, 0.08], [0.95, 0.95, 0.85]]))
    if category == "vehicle.trailer":
        body = _jitter(rng, rng.choice([[0.90, 0.90, 0.90], [0.55, 0.57, 0.60], [0.20, 0.30, 0.50], [0.75, 0.65, 0.5]]))
        return Look("trailer", np.stack([body, [0.15, 0.15, 0.15], [0.85, 0.10, 0.08], body * 0.8]))
    if category == "vehicle.construction":
        body = _jitter(rng, rng.choice([[0.95, 0.70, 0.05], [0.95, 0.45, 0.05], [0.85, 0.80, 0.15]]), 0.04)
        return Look("construction", np.stack([body, [0.08, 0.10, 0.13], [0.20, 0.20, 0.20], [0.95, 0.95, 0.85]]))
    if category.startswith("human.pedestrian"):
        shirt = _jitter(rng, _pick(rng, _CLOTHES))
        if category.endswith("construction_worker"):
            shirt = _jitter(rng, [0.95, 0.55, 0.05], 0.03)  # hi-vis vest
        elif category.endswith("police_officer"):
            shirt = _jitter(rng, [0.10, 0.15, 0.35], 0.02)
        pants = _jitter(rng, _pick(rng, _CLOTHES[[0, 3, 6, 7]]))
        return Look("pedestrian", np.stack([shirt, pants, _pick(rng, _SKIN), [0.1, 0.08, 0.06]]))
    if category in ("vehicle.bicycle", "vehicle.motorcycle"):
        frame_colour = _jitter(rng, _pick(rng, np.concatenate([_CAR_COLOURS, _CLOTHES])))
        rider = _jitter(rng, _pick(rng, _CLOTHES)) if attribute == "cycle.with_rider" else frame_colour
        has_rider = 1.0 if attribute == "cycle.with_rider" else 0.0
        return Look("cycle", np.stack([frame_colour, rider, [0.06, 0.06, 0.06], [has_rider, 0.0, 0.0]]))
    if category == "movable_object.trafficcone":
        return Look("cone", np.stack([_jitter(rng, [0.98, 0.42, 0.05], 0.03), [0.97, 0.97, 0.95], [0.1] * 3, [0] * 3]))
    if category == "movable_object.barrier":
        stripe = rng.choice([[0.85, 0.10, 0.08], [0.95, 0.80, 0.05], [0.62, 0.62, 0.60]])
        base = [0.95, 0.95, 0.93] if stripe[2] < 0.5 else [0.55, 0.55, 0.53]
        return Look("barrier", np.stack([_jitter(rng, stripe, 0.03), _jitter(rng, base, 0.02), [0.2] * 3, [0] * 3]))
    if category == "":
        facade = _jitter(rng, _pick(rng, _FACADES), 0.04)
        window = _jitter(rng, [0.20, 0.27, 0.35], 0.04)
        return Look("building", np.stack([facade, window, facade * 0.7, [rng.uniform(2.5, 4.0), 0, 0]]))
    raise ValueError(f"no appearance for category {category!r}")


# --------------------------------------------------------------------------------------------------
# Placement with collision checks.


def _footprints(s, d, yaw, velocity_sd, width, length, times) -> np.ndarray:
    """Footprint corners [F, 4, 2] of a box moving at constant velocity, in the road frame."""
    half = np.array([[length, width], [length, -width], [-length, -width], [-length, width]]) / 2.0
    corners = rotate_2d(half, yaw)  # (4, 2)
    centres = np.array([s, d]) + np.asarray(velocity_sd)[None, :] * times[:, None]  # (F, 2)
    return centres[:, None, :] + corners[None, :, :]


def _overlaps_any(candidate: np.ndarray, placed: np.ndarray) -> bool:
    """Separating-axis test of one footprint track [F, 4, 2] against M placed tracks [M, F, 4, 2]."""
    if len(placed) == 0:
        return False
    candidate_axes = np.stack([candidate[:, 1] - candidate[:, 0], candidate[:, 3] - candidate[:, 0]], axis=1)
    placed_axes = np.stack([placed[:, :, 1] - placed[:, :, 0], placed[:, :, 3] - placed[:, :, 0]], axis=2)
    axes = np.concatenate([np.broadcast_to(candidate_axes, placed_axes.shape), placed_axes], axis=2)  # (M,F,4,2)
    on_candidate = np.einsum("mfad,fkd->mfak", axes, candidate)
    on_placed = np.einsum("mfad,mfkd->mfak", axes, placed)
    separated = (on_candidate.max(-1) < on_placed.min(-1)) | (on_placed.max(-1) < on_candidate.min(-1))
    return bool(np.any(~separated.any(axis=2)))


class _Placer:
    """Collects boxes in the road frame, refusing any that would overlap an earlier one at any frame."""

    def __init__(self, rng: np.random.Generator, times: np.ndarray):
        self.rng = rng
        self.times = times
        self.tracks: list[np.ndarray] = []
        self.records: list[tuple] = []

    def block(self, s: float, d: float, yaw: float, velocity_sd, width: float, length: float) -> None:
        """Reserve space (e.g. for the ego) without creating an object."""
        self.tracks.append(_footprints(s, d, yaw, velocity_sd, width, length, self.times))

    def add(self, category, attribute, size_wlh, s, d, yaw, velocity_sd=(0.0, 0.0), margin=0.3) -> bool:
        """Place a box (centre s, d; heading yaw in the road frame) unless it collides. Returns success."""
        width, length = size_wlh[0] + 2 * margin, size_wlh[1] + 2 * margin
        track = _footprints(s, d, yaw, velocity_sd, width, length, self.times)
        if _overlaps_any(track, np.asarray(self.tracks)):
            return False
        self.tracks.append(_footprints(s, d, yaw, velocity_sd, size_wlh[0], size_wlh[1], self.times))
        look = _look_for(category, attribute, self.rng)
        self.records.append((category, attribute, np.asarray(size_wlh, dtype=np.float64), s, d, yaw, velocity_sd, look))
        return True


def _size(rng: np.random.Generator, category: str, spread: float = 0.08) -> np.ndarray:
    """Class-typical size (w, l, h) with a few percent of per-object variation."""
    mean = np.array(CATEGORY_SIZE_WLH[category])
    return mean * np.clip(rng.normal(1.0, spread, 3), 1.0 - 2.5 * spread, 1.0 + 2.5 * spread)


def _pedestrian_category(rng: np.random.Generator) -> str:
    names = ["human.pedestrian.adult", "human.pedestrian.child", "human.pedestrian.police_officer"]
    return names[rng.choice(3, p=[0.88, 0.08, 0.04])]


# --------------------------------------------------------------------------------------------------
# Scene sampling.


def _sample_layout(rng: np.random.Generator) -> RoadLayout:
    lanes = int(rng.choice([1, 2, 2, 3]))
    return RoadLayout(
        origin_xy=rng.uniform(-800.0, 800.0, 2),
        yaw=float(rng.uniform(-np.pi, np.pi)),
        lane_width=float(rng.uniform(3.2, 3.7)),
        lanes_per_direction=lanes,
        parking_width=float(rng.choice([0.0, 2.5])),
        sidewalk_width=float(rng.uniform(2.5, 4.5)),
        verge_depth=float(rng.uniform(8.0, 20.0)),
        verge_is_lot=(bool(rng.random() < 0.6), bool(rng.random() < 0.6)),
        asphalt=float(rng.uniform(0.22, 0.38)),
        sidewalk=float(rng.uniform(0.55, 0.72)),
        grass_rgb=tuple(_jitter(rng, [0.30, 0.45, 0.20], 0.04)),
        lot_rgb=tuple(_jitter(rng, [0.45, 0.43, 0.40], 0.04)),
    )


def _sample_lighting(rng: np.random.Generator) -> Lighting:
    azimuth, elevation = rng.uniform(-np.pi, np.pi), rng.uniform(np.radians(20), np.radians(70))
    sun = np.array([np.cos(elevation) * np.cos(azimuth), np.cos(elevation) * np.sin(azimuth), np.sin(elevation)])
    overcast = rng.random() < 0.3
    zenith = np.array([0.55, 0.58, 0.62]) if overcast else _jitter(rng, [0.30, 0.50, 0.85], 0.04)
    horizon = _jitter(rng, [0.82, 0.84, 0.86] if overcast else [0.78, 0.84, 0.92], 0.03)
    return Lighting(sun, float(rng.uniform(0.75, 1.1)), horizon, zenith, horizon * 0.95)


def _add_lane_traffic(placer: _Placer, layout: RoadLayout, ego_lane: int, ego_speed: float, s_range, duration):
    rng = placer.rng
    kinds = ["car", "truck", "bus", "construction", "motorcycle", "truck+trailer"]
    weights = [0.62, 0.10, 0.07, 0.04, 0.09, 0.08]  # car-dominated like nuScenes, rarer classes boosted a bit
    for side in (-1, 1):  # -1: right side, driving towards +s
        direction = -side
        for lane in range(layout.lanes_per_direction):
            d = side * (lane + 0.5) * layout.lane_width
            is_ego_lane = side == -1 and lane == ego_lane
            speed = ego_speed if is_ego_lane else (0.0 if rng.random() < 0.2 else rng.uniform(3.0, 13.0))
            moving = speed > 0.0
            # Start far enough back that traffic flowing in still reaches the window during the scene.
            s = s_range[0] - (speed * duration if direction > 0 else 0.0) + rng.uniform(0.0, 12.0)
            s_end = s_range[1] + (speed * duration if direction < 0 else 0.0)
            yaw = 0.0 if direction > 0 else np.pi
            velocity = (direction * speed, 0.0)
            vehicle_attribute = "vehicle.moving" if moving else "vehicle.stopped"
            while s < s_end:
                kind = kinds[rng.choice(len(kinds), p=weights)]
                lateral = d + rng.normal(0.0, 0.12)
                heading = yaw + rng.normal(0.0, 0.01)
                if kind == "truck+trailer":
                    length = _add_truck_with_trailer(placer, s, lateral, heading, velocity, vehicle_attribute)
                else:
                    category = {
                        "car": "vehicle.car",
                        "truck": "vehicle.truck",
                        "bus": "vehicle.bus.bendy" if rng.random() < 0.1 else "vehicle.bus.rigid",
                        "construction": "vehicle.construction",
                        "motorcycle": "vehicle.motorcycle",
                    }[kind]
                    attribute = "cycle.with_rider" if kind == "motorcycle" else vehicle_attribute
                    size = _size(rng, category)
                    placer.add(category, attribute, size, s + size[1] / 2, lateral, heading, velocity)
                    length = size[1]
                gap = rng.uniform(2.0, 6.0) if not moving else rng.uniform(4.0, 25.0)
                s += length + gap


def _add_truck_with_trailer(placer: _Placer, s: float, d: float, heading: float, velocity, attribute: str) -> float:
    """A tractor and its trailer occupying [s, s + length) along the lane, trailer behind in the driving
    direction (the heading is 0 for +s traffic, pi for -s traffic). Returns the combined length."""
    rng = placer.rng
    trailer, truck = _size(rng, "vehicle.trailer"), _size(rng, "vehicle.truck")
    truck[1] = rng.uniform(5.5, 6.5)  # a tractor unit is shorter than a rigid truck
    gap = 0.6
    towards_plus_s = np.cos(heading) > 0
    rear, front = (trailer, truck) if towards_plus_s else (truck, trailer)
    rear_s, front_s = s + rear[1] / 2, s + rear[1] + gap + front[1] / 2
    trailer_s, truck_s = (rear_s, front_s) if towards_plus_s else (front_s, rear_s)
    if placer.add("vehicle.trailer", attribute, trailer, trailer_s, d, heading, velocity):
        placer.add("vehicle.truck", attribute, truck, truck_s, d, heading, velocity, margin=0.0)
    return trailer[1] + gap + truck[1]


def _add_parking(placer: _Placer, layout: RoadLayout, s_range) -> None:
    if layout.parking_width == 0.0:
        return
    rng = placer.rng
    for side in (-1, 1):
        d = side * (layout.lanes_per_direction * layout.lane_width + layout.parking_width / 2)
        yaw = 0.0 if side < 0 else np.pi
        s = s_range[0] + rng.uniform(0.0, 8.0)
        while s < s_range[1]:
            if rng.random() < 0.25:  # an empty stretch of kerb
                s += rng.uniform(5.0, 20.0)
                continue
            category = ["vehicle.car", "vehicle.truck", "vehicle.motorcycle"][rng.choice(3, p=[0.86, 0.08, 0.06])]
            attribute = "cycle.without_rider" if category == "vehicle.motorcycle" else "vehicle.parked"
            size = _size(rng, category)
            heading = yaw + rng.normal(0.0, 0.04) + (rng.choice([0, np.pi / 2]) if category.endswith("cycle") else 0)
            placer.add(category, attribute, size, s + size[1] / 2, d + rng.normal(0.0, 0.1), heading)
            s += size[1] + rng.uniform(0.8, 6.0)


def _add_sidewalk_life(placer: _Placer, layout: RoadLayout, s_range) -> None:
    rng = placer.rng
    for side in (-1, 1):
        inner, outer = layout.road_half_width + 0.4, layout.sidewalk_outer - 0.4
        for _ in range(rng.poisson(7)):
            category = _pedestrian_category(rng)
            size = _size(rng, category, 0.06)
            s, d = rng.uniform(*s_range), side * rng.uniform(inner, outer)
            if rng.random() < 0.65:
                direction, speed = rng.choice([-1.0, 1.0]), rng.uniform(0.6, 1.8)
                yaw = (0.0 if direction > 0 else np.pi) + rng.normal(0.0, 0.05)
                velocity = (speed * np.cos(yaw), speed * np.sin(yaw))
                placer.add(category, "pedestrian.moving", size, s, d, yaw, velocity, margin=0.15)
            else:
                placer.add(category, "pedestrian.standing", size, s, d, rng.uniform(-np.pi, np.pi), margin=0.15)
        for _ in range(rng.poisson(1.5)):  # parked bicycles and motorcycles, roughly across the sidewalk
            category = "vehicle.bicycle" if rng.random() < 0.7 else "vehicle.motorcycle"
            yaw = side * np.pi / 2 + rng.normal(0.0, 0.25) + rng.choice([0.0, np.pi])
            s, d = rng.uniform(*s_range), side * rng.uniform(inner + 0.5, outer)
            placer.add(category, "cycle.without_rider", _size(rng, category), s, d, yaw, margin=0.1)
        if rng.random() < 0.5:  # a cyclist riding along the sidewalk
            direction, speed = rng.choice([-1.0, 1.0]), rng.uniform(2.0, 5.0)
            yaw = 0.0 if direction > 0 else np.pi
            s, d, size = rng.uniform(*s_range), side * rng.uniform(inner, outer), _size(rng, "vehicle.bicycle")
            placer.add("vehicle.bicycle", "cycle.with_rider", size, s, d, yaw, (direction * speed, 0.0), margin=0.2)
        if rng.random() < 0.4:  # cones along the kerb
            s = rng.uniform(*s_range)
            d = side * (layout.road_half_width + 0.35)
            for _ in range(rng.integers(2, 7)):
                size, yaw = _size(rng, "movable_object.trafficcone", 0.05), rng.uniform(-np.pi, np.pi)
                placer.add("movable_object.trafficcone", "", size, s, d, yaw, margin=0.05)
                s += rng.uniform(1.5, 4.0)
        if rng.random() < 0.3:  # a row of barriers on the sidewalk; a barrier's long side is its width
            _add_barrier_row(placer, rng.uniform(*s_range), side * (layout.road_half_width + 0.6), 0.0)


def _add_barrier_row(placer: _Placer, s: float, d: float, row_heading: float) -> None:
    rng = placer.rng
    direction = np.array([np.cos(row_heading), np.sin(row_heading)])
    position = np.array([s, d])
    for _ in range(rng.integers(3, 9)):
        size = _size(placer.rng, "movable_object.barrier", 0.05)
        # The box heading is perpendicular to the row, so the width (long side) runs along the row.
        heading = row_heading + np.pi / 2 + rng.choice([0.0, np.pi]) + rng.normal(0.0, 0.03)
        placer.add("movable_object.barrier", "", size, position[0], position[1], heading, margin=0.02)
        position = position + direction * (size[0] + rng.uniform(0.05, 0.4))


def _add_verge(placer: _Placer, layout: RoadLayout, s_range) -> None:
    rng = placer.rng
    lot_categories = ["vehicle.car", "vehicle.truck", "vehicle.trailer", "vehicle.construction", "vehicle.bus.rigid"]
    for side, is_lot in zip((-1, 1), layout.verge_is_lot, strict=True):
        inner, outer = layout.sidewalk_outer + 1.0, layout.verge_outer - 1.0
        if outer - inner < 3.0:
            continue
        if is_lot:
            for _ in range(rng.poisson(6)):
                category = lot_categories[rng.choice(5, p=[0.62, 0.12, 0.1, 0.08, 0.08])]
                if rng.random() < 0.6:  # parked along the lot's grid
                    yaw = rng.integers(4) * np.pi / 2 + rng.normal(0, 0.05)
                else:
                    yaw = rng.uniform(-np.pi, np.pi)
                s, d = rng.uniform(*s_range), side * rng.uniform(inner, outer)
                placer.add(category, "vehicle.parked", _size(rng, category), s, d, yaw)
        if rng.random() < 0.35:  # construction site: machine, barriers, cones, workers
            s0, d0 = rng.uniform(*s_range), side * rng.uniform(inner + 2.0, max(inner + 2.5, outer - 2.0))
            moving = rng.random() < 0.3
            yaw = rng.uniform(-np.pi, np.pi)
            velocity = (np.cos(yaw), np.sin(yaw)) if moving else (0.0, 0.0)  # creeping at 1 m/s
            attribute, size = "vehicle.moving" if moving else "vehicle.parked", _size(rng, "vehicle.construction")
            placer.add("vehicle.construction", attribute, size, s0, d0, yaw, velocity)
            _add_barrier_row(placer, s0 - 8.0, side * inner, 0.0)
            for _ in range(rng.integers(2, 8)):
                size = _size(rng, "movable_object.trafficcone", 0.05)
                s, d = s0 + rng.uniform(-10, 10), side * rng.uniform(inner, outer)
                placer.add("movable_object.trafficcone", "", size, s, d, 0.0, margin=0.05)
            for _ in range(rng.integers(1, 4)):
                category = "human.pedestrian.construction_worker"
                size, s, d = _size(rng, category, 0.05), s0 + rng.uniform(-8, 8), side * rng.uniform(inner, outer)
                placer.add(category, "pedestrian.standing", size, s, d, rng.uniform(-np.pi, np.pi), margin=0.15)
        for _ in range(rng.poisson(2)):  # people crossing the verge in any direction
            category = _pedestrian_category(rng)
            yaw, speed = rng.uniform(-np.pi, np.pi), rng.uniform(0.6, 1.6)
            s, d = rng.uniform(*s_range), side * rng.uniform(inner, outer)
            velocity = (speed * np.cos(yaw), speed * np.sin(yaw))
            placer.add(category, "pedestrian.moving", _size(rng, category, 0.06), s, d, yaw, velocity, margin=0.15)


def _add_buildings(placer: _Placer, layout: RoadLayout, s_range) -> None:
    rng = placer.rng
    for side in (-1, 1):
        s = s_range[0] - 30.0
        while s < s_range[1] + 30.0:
            length = rng.uniform(8.0, 30.0)
            if rng.random() < 0.75:
                depth, height = rng.uniform(8.0, 20.0), rng.uniform(4.0, 20.0)
                d = side * (layout.verge_outer + depth / 2 + rng.uniform(0.0, 3.0))
                placer.add("", "", np.array([depth, length, height]), s + length / 2, d, 0.0, margin=0.0)
            s += length + rng.uniform(0.0, 8.0)


def sample_scene(rng: np.random.Generator, num_frames: int) -> Scene:
    """Sample one scene of `num_frames` keyframes, FRAME_INTERVAL_S apart.

    Args:
        rng: the scene's own generator; the scene is a pure function of its state.
        num_frames: number of keyframes F (>= 2 so every object has a velocity estimate).
    Returns:
        The Scene, with objects never within ANNOTATION_RADIUS_M of the ego removed.
    """
    if num_frames < 2:
        raise ValueError("scenes need at least 2 frames (the nuScenes eval estimates velocity from neighbours)")
    times = np.arange(num_frames) * FRAME_INTERVAL_S
    duration = float(times[-1])
    layout = _sample_layout(rng)
    lighting = _sample_lighting(rng)

    ego_lane = int(rng.integers(layout.lanes_per_direction))
    ego_speed = 0.0 if rng.random() < 0.15 else float(rng.uniform(3.0, 11.0))
    ego_d = -(ego_lane + 0.5) * layout.lane_width
    s_range = (-ANNOTATION_RADIUS_M + 5.0, ego_speed * duration + ANNOTATION_RADIUS_M - 5.0)

    placer = _Placer(rng, times)
    placer.block(EGO_CENTER_OFFSET_X, ego_d, 0.0, (ego_speed, 0.0), EGO_SIZE_WLH[0] + 1.0, EGO_SIZE_WLH[1] + 3.0)
    _add_lane_traffic(placer, layout, ego_lane, ego_speed, s_range, duration)
    _add_parking(placer, layout, s_range)
    _add_sidewalk_life(placer, layout, s_range)
    _add_verge(placer, layout, s_range)
    _add_buildings(placer, layout, s_range)

    # Road frame -> global frame.
    ego_start = layout.origin_xy + rotate_2d(np.array([0.0, ego_d]), layout.yaw)
    ego_velocity = rotate_2d(np.array([ego_speed, 0.0]), layout.yaw)
    ego_track = ego_start[None] + ego_velocity[None] * times[:, None]  # (F, 2)

    categories, attributes, sizes, starts, velocities, yaws, looks = [], [], [], [], [], [], []
    for category, attribute, size, s, d, yaw, velocity_sd, look in placer.records:
        start = layout.origin_xy + rotate_2d(np.array([s, d]), layout.yaw)
        velocity = rotate_2d(np.asarray(velocity_sd, dtype=np.float64), layout.yaw)
        track = start[None] + velocity[None] * times[:, None]
        closest = np.min(np.linalg.norm(track - ego_track, axis=1))
        if category and closest > ANNOTATION_RADIUS_M:
            continue
        categories.append(category)
        attributes.append(attribute)
        sizes.append(size)
        starts.append(start)
        velocities.append(velocity)
        yaws.append(np.arctan2(np.sin(yaw + layout.yaw), np.cos(yaw + layout.yaw)))
        looks.append(look)

    return Scene(
        road=layout,
        lighting=lighting,
        frame_times=times,
        ego_start_xy=ego_start,
        ego_velocity_xy=ego_velocity,
        ego_yaw=float(layout.yaw),
        categories=categories,
        attributes=attributes,
        sizes_wlh=np.array(sizes).reshape(-1, 3),
        start_xy=np.array(starts).reshape(-1, 2),
        velocities_xy=np.array(velocities).reshape(-1, 2),
        yaws=np.array(yaws),
        looks=looks,
    )
