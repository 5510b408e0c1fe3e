"""nuScenes vocabulary used by the synthetic generator: detection classes, categories, attributes, sizes.

Names follow the nuScenes schema exactly so that the devkit's `category_to_detection_name` and the
detection eval's attribute logic work on the generated tables without any mapping of ours.
"""

from __future__ import annotations

# Detection classes in the order PETR-family detectors (and mmdet3d's nuScenes configs) use for
# their 10 logits; `gt_labels` produced by `load_frames` index into this tuple.
DETECTION_CLASSES: tuple[str, ...] = (
    "car",
    "truck",
    "construction_vehicle",
    "bus",
    "trailer",
    "barrier",
    "motorcycle",
    "bicycle",
    "pedestrian",
    "traffic_cone",
)

# nuScenes category name -> detection class. Only categories the generator can emit are listed;
# the devkit maps them the same way (nuscenes.eval.detection.utils.category_to_detection_name).
CATEGORY_TO_CLASS: dict[str, str] = {
    "vehicle.car": "car",
    "vehicle.truck": "truck",
    "vehicle.construction": "construction_vehicle",
    "vehicle.bus.rigid": "bus",
    "vehicle.bus.bendy": "bus",
    "vehicle.trailer": "trailer",
    "movable_object.barrier": "barrier",
    "vehicle.motorcycle": "motorcycle",
    "vehicle.bicycle": "bicycle",
    "human.pedestrian.adult": "pedestrian",
    "human.pedestrian.child": "pedestrian",
    "human.pedestrian.construction_worker": "pedestrian",
    "human.pedestrian.police_officer": "pedestrian",
    "movable_object.trafficcone": "traffic_cone",
}

# The full nuScenes v1.0 category list, written to category.json so the table looks like the real one.
CATEGORY_DESCRIPTIONS: dict[str, str] = {
    "human.pedestrian.adult": "Adult subcategory.",
    "human.pedestrian.child": "Child subcategory.",
    "human.pedestrian.wheelchair": "Wheelchairs.",
    "human.pedestrian.stroller": "Strollers.",
    "human.pedestrian.personal_mobility": "Small electric or self-propelled vehicles.",
    "human.pedestrian.police_officer": "Police officer.",
    "human.pedestrian.construction_worker": "Construction worker.",
    "animal": "All animals.",
    "vehicle.car": "Vehicle designed primarily for personal use.",
    "vehicle.motorcycle": "Gasoline or electric powered 2-wheeled vehicle.",
    "vehicle.bicycle": "Human or electric powered 2-wheeled vehicle.",
    "vehicle.bus.bendy": "Bendy bus subcategory.",
    "vehicle.bus.rigid": "Rigid bus subcategory.",
    "vehicle.truck": "Vehicles primarily designed to haul cargo.",
    "vehicle.construction": "Vehicles primarily designed for construction.",
    "vehicle.emergency.ambulance": "All types of ambulances.",
    "vehicle.emergency.police": "All types of police vehicles.",
    "vehicle.trailer": "Any vehicle trailer.",
    "movable_object.barrier": "Temporary road barrier placed in the scene.",
    "movable_object.trafficcone": "All types of traffic cone.",
    "movable_object.pushable_pullable": "Objects that a pedestrian may push or pull.",
    "movable_object.debris": "Movable object that is left on the driveable surface.",
    "static_object.bicycle_rack": "Area or device intended to park or secure the bicycles in a row.",
}

# The eight nuScenes attributes (attribute.json). The eval scores attribute accuracy per class group.
ATTRIBUTE_DESCRIPTIONS: dict[str, str] = {
    "vehicle.moving": "Vehicle is moving.",
    "vehicle.stopped": "Vehicle, with a driver/rider in/on it, is currently stationary but has an intent to move.",
    "vehicle.parked": "Vehicle is stationary (usually for longer duration) with no immediate intent to move.",
    "cycle.with_rider": "There is a rider on the bicycle or motorcycle.",
    "cycle.without_rider": "There is NO rider on the bicycle or motorcycle.",
    "pedestrian.sitting_lying_down": "The human is sitting or lying down.",
    "pedestrian.standing": "The human is standing.",
    "pedestrian.moving": "The human is moving.",
}

# visibility.json: token -> (level, description). Visibility is the visible fraction of the box
# over all six images, binned as in nuScenes.
VISIBILITY_LEVELS: dict[str, tuple[str, str]] = {
    "1": ("v0-40", "visibility of whole object is between 0 and 40%"),
    "2": ("v40-60", "visibility of whole object is between 40 and 60%"),
    "3": ("v60-80", "visibility of whole object is between 60 and 80%"),
    "4": ("v80-100", "visibility of whole object is between 80 and 100%"),
}

# Mean box size (width, length, height) in metres per category, close to the nuScenes averages.
# nuScenes convention: length is along the heading (box x axis), width across it (box y axis).
CATEGORY_SIZE_WLH: dict[str, tuple[float, float, float]] = {
    "vehicle.car": (1.95, 4.62, 1.73),
    "vehicle.truck": (2.51, 6.93, 2.84),
    "vehicle.construction": (2.73, 6.37, 3.19),
    "vehicle.bus.rigid": (2.95, 11.2, 3.47),
    "vehicle.bus.bendy": (2.97, 17.0, 3.31),
    "vehicle.trailer": (2.90, 10.5, 3.87),
    "movable_object.barrier": (2.53, 0.50, 0.98),
    "vehicle.motorcycle": (0.77, 2.11, 1.47),
    "vehicle.bicycle": (0.61, 1.70, 1.28),
    "human.pedestrian.adult": (0.67, 0.73, 1.77),
    "human.pedestrian.child": (0.50, 0.52, 1.30),
    "human.pedestrian.construction_worker": (0.72, 0.75, 1.78),
    "human.pedestrian.police_officer": (0.70, 0.74, 1.80),
    "movable_object.trafficcone": (0.41, 0.41, 1.07),
}
