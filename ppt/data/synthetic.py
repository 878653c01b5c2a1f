"""Three-domain synthetic rooms written in the real preprocessed layouts.

``generate(out, scenes_per_domain, seed)`` writes ``<out>/scannet``, ``<out>/s3dis`` and
``<out>/structured3d`` with the real class lists. The same object TYPE carries the same class
name wherever the dataset has that class; grouping differs (a bookshelf is ``bookshelf`` in
ScanNet, ``bookcase`` in S3DIS, ``shelves`` in Structured3D). Domains differ the way the real
sensors do, so a single model suffers negative transfer unless told the domain:

- scannet: RGB-D reconstruction: ~1 cm noise, holes, no ceiling, uneven density (sparser up
  high), warm dim colours with a lighting gradient; residential rooms and offices.
- s3dis: dense laser scan: 2 mm noise, beams/columns/boards, greyish colours, office rooms,
  conference rooms and hallways; most furniture lumped into ``clutter``.
- structured3d: clean renders: no noise, uniform density, saturated colours per instance,
  residential rooms with pillows, lamps, televisions, nightstands.

Each scene uses its own ``np.random.default_rng([seed, domain, scene])``: results do not
depend on generation order.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ppt.data.classes import DATASETS, IGNORE_INDEX, S3DIS_AREAS
from ppt.data.scene_io import write_scene
from ppt.data.synthetic_rooms import Room, add_object

DOMAINS = ("scannet", "s3dis", "structured3d")

# Abstract object type -> class name in each dataset (None = ignore label).
_SHARED = ("wall", "floor", "door", "window", "chair", "sofa", "table")
LABEL_MAP: dict[str, dict[str, str | None]] = {
    "scannet": {**{k: k for k in _SHARED}, "ceiling": None, "bed": "bed", "pillow": None,
                "desk": "desk", "cabinet": "cabinet", "bookshelf": "bookshelf", "picture": "picture",
                "curtain": "curtain", "refrigerator": "refrigerator", "toilet": "toilet", "sink": "sink",
                "bathtub": "bathtub", "shower_curtain": "shower curtain", "counter": "counter",
                "nightstand": "otherfurniture",
                "dresser": "otherfurniture", "lamp": None, "tv": None, "mirror": None, "board": None,
                "beam": None, "column": None, "clutter": None},
    "s3dis": {**{k: k for k in _SHARED}, "ceiling": "ceiling", "desk": "table", "bookshelf": "bookcase",
              "cabinet": "bookcase", "board": "board", "picture": "board", "beam": "beam",
              "column": "column"},                                    # anything else: clutter
    "structured3d": {**{k: k for k in _SHARED}, "ceiling": "ceiling", "bed": "bed", "pillow": "pillow",
                     "desk": "desk", "cabinet": "cabinet", "bookshelf": "shelves", "picture": "picture",
                     "curtain": "curtain", "refrigerator": "refrigerator", "toilet": None,
                     "sink": "sink",
                     "bathtub": None, "shower_curtain": "curtain", "counter": "otherfurniture",
                     "nightstand": "nightstand",
                     "dresser": "dresser", "lamp": "lamp", "tv": "television", "mirror": "mirror",
                     "board": "otherprop", "beam": "otherstructure", "column": "otherstructure",
                     "clutter": "otherprop"},
}

# Room recipes: (room type, size ranges (w, l, h), {type: (min, max) count}).
_BEDROOM = ("bedroom", ((3, 5), (3, 5), (2.5, 2.9)),
            {"bed": (1, 1), "nightstand": (0, 2), "dresser": (0, 1), "cabinet": (0, 1), "lamp": (0, 1),
             "pillow": (0, 0), "desk": (0, 1), "chair": (0, 1), "picture": (0, 2), "tv": (0, 1),
             "door": (1, 1), "window": (1, 2), "curtain": (0, 2), "clutter": (1, 4)})
_LIVING = ("living", ((4, 7), (4, 6), (2.6, 3.0)),
           {"sofa": (1, 2), "table": (1, 2), "chair": (1, 4), "cabinet": (0, 2), "bookshelf": (0, 2),
            "tv": (0, 1), "lamp": (0, 2), "picture": (1, 3), "door": (1, 2), "window": (1, 3),
            "curtain": (0, 2), "clutter": (2, 6)})
_KITCHEN = ("kitchen", ((3, 5), (3, 5), (2.5, 2.9)),
            {"counter": (1, 2), "refrigerator": (1, 1), "sink": (1, 1), "cabinet": (1, 3),
             "table": (0, 1), "chair": (0, 4), "door": (1, 1), "window": (0, 1), "clutter": (2, 5)})
_BATHROOM = ("bathroom", ((2, 3.2), (2, 3.2), (2.4, 2.8)),
             {"toilet": (1, 1), "sink": (1, 1), "bathtub": (0, 1), "shower_curtain": (0, 1),
              "mirror": (1, 1), "cabinet": (0, 1),
              "door": (1, 1), "window": (0, 1), "clutter": (0, 2)})
_OFFICE = ("office", ((3, 7), (3, 7), (2.6, 3.2)),
           {"desk": (1, 4), "chair": (1, 5), "bookshelf": (0, 2), "cabinet": (0, 2), "table": (0, 1),
            "picture": (0, 2), "door": (1, 1), "window": (0, 2), "clutter": (3, 10)})
ROOMS = {
    "scannet": (_BEDROOM, _LIVING, _KITCHEN, _BATHROOM, _OFFICE),
    "s3dis": (
        ("office", ((3, 7), (3, 8), (2.8, 3.4)),
         {"desk": (1, 4), "table": (0, 2), "chair": (2, 6), "bookshelf": (1, 3), "cabinet": (0, 2),
          "board": (0, 1), "sofa": (0, 1), "beam": (0, 2), "column": (0, 2), "door": (1, 2),
          "window": (0, 2), "clutter": (6, 14)}),
        ("conferenceRoom", ((5, 9), (4, 7), (2.8, 3.4)),
         {"table": (1, 2), "chair": (4, 10), "board": (1, 2), "bookshelf": (0, 1), "beam": (0, 2),
          "column": (0, 2), "door": (1, 2), "window": (0, 3), "clutter": (3, 8)}),
        ("hallway", ((1.8, 2.6), (6, 12), (2.8, 3.2)),
         {"door": (2, 5), "column": (0, 3), "beam": (0, 3), "board": (0, 1), "clutter": (1, 4)}),
    ),
    # Rendered homes: more lamps and televisions, and occasional columns / beams.
    "structured3d": tuple(
        (n, s, rec if n == "bathroom" else {**rec, "lamp": (1, 2), "tv": (0, 1), "column": (0, 1),
                                            "beam": (0, 1)})
        for n, s, rec in (_BEDROOM, _LIVING, _KITCHEN, _BATHROOM)),
}

# Base RGB of each abstract type (shared by all domains; domain styles then shift it).
BASE_COLOR = {
    "wall": (200, 195, 185), "floor": (140, 105, 75), "ceiling": (225, 225, 220), "door": (150, 100, 60),
    "window": (170, 200, 220), "bed": (200, 190, 170), "pillow": (230, 225, 215), "chair": (90, 70, 60),
    "sofa": (110, 90, 120), "table": (160, 120, 80), "desk": (170, 140, 100), "cabinet": (180, 160, 130),
    "bookshelf": (130, 90, 55), "picture": (120, 140, 160), "curtain": (170, 150, 120),
    "refrigerator": (220, 220, 225), "toilet": (235, 235, 235), "sink": (210, 210, 215),
    "bathtub": (230, 230, 230), "counter": (150, 150, 140), "nightstand": (140, 100, 70),
    "dresser": (150, 110, 80), "lamp": (230, 210, 160), "tv": (30, 30, 35), "mirror": (190, 200, 205),
    "board": (235, 235, 230), "beam": (190, 190, 185), "column": (195, 195, 190),
    "clutter": (120, 120, 120),
    "shower_curtain": (200, 210, 225),
}


def _label_table(domain: str, types: list[str]) -> np.ndarray:
    info = DATASETS[domain]
    index = {name: i for i, name in enumerate(info.class_names)}
    fallback = "clutter" if domain == "s3dis" else None
    names = [LABEL_MAP[domain].get(t, fallback) for t in types]
    return np.array([index[n] if n is not None else IGNORE_INDEX for n in names], np.int16)


def _build_room(domain: str, rng: np.random.Generator) -> Room:
    kind, sizes, recipe = ROOMS[domain][int(rng.integers(len(ROOMS[domain])))]
    room = Room(rng, *(rng.uniform(lo, hi) for lo, hi in sizes))
    # ScanNet scans see (almost) no ceiling: 80 % of rooms have none, the rest a sparse one.
    room.shell(ceiling=domain != "scannet" or rng.random() < 0.2)
    tops: list = []
    order = sorted(recipe, key=lambda k: k == "clutter")          # clutter last: it needs tops
    for kind in order:
        lo, hi = recipe[kind]
        for _ in range(int(rng.integers(lo, hi + 1))):
            add_object(room, kind, tops)
    return room


def _style_colors(domain: str, types: list[str], obj: np.ndarray, coord: np.ndarray, size: np.ndarray,
                  rng: np.random.Generator) -> np.ndarray:
    base = np.array([BASE_COLOR[t] for t in types], np.float32)
    # Per-instance variation around the type's base colour.
    inst = base + rng.normal(0, 18, base.shape)
    if domain == "structured3d":
        # Saturated synthetic materials: push away from grey, random hue shift per instance.
        grey = inst.mean(1, keepdims=True)
        inst = grey + 2.2 * (inst - grey) + rng.normal(0, 35, inst.shape)
        color = inst[obj]
    elif domain == "s3dis":
        grey = inst.mean(1, keepdims=True)
        inst = (0.35 * inst + 0.65 * grey) * np.array([0.93, 0.97, 1.05]) * rng.uniform(0.8, 0.95)
        color = inst[obj] + rng.normal(0, 6, (len(obj), 3))
    else:
        # Warm, dim, lit from one point: brightness falls off with distance to the light.
        light = rng.uniform((0, 0, 2.0), size)
        dist = np.linalg.norm(coord - light, axis=1, keepdims=True)
        shade = 1.0 - 0.45 * dist / max(dist.max(), 1e-6)
        inst = inst * np.array([1.0, 0.84, 0.64]) * rng.uniform(0.55, 0.8)
        color = inst[obj] * shade + rng.normal(0, 9, (len(obj), 3))
    return np.clip(color, 0, 255).round().astype(np.uint8)


def make_scene(domain: str, rng: np.random.Generator,
               num_points: int | None = None) -> dict[str, np.ndarray]:
    """One synthetic room of ``domain`` as the arrays of its layout (coord, color, normal,
    segment/segment20, instance); about ``num_points`` points (default: random 20k-60k)."""
    if domain not in DOMAINS:
        raise KeyError(f"unknown domain {domain!r}; valid: {', '.join(DOMAINS)}")
    room = _build_room(domain, rng)
    target = int(rng.integers(20_000, 60_000)) if num_points is None else num_points
    if domain == "scannet":
        coord, normal, obj = room.sample(int(target * 1.2), density_jitter=0.5)
        # Holes (unscanned patches) and fewer points up high, where the camera rarely looks.
        keep = rng.random(len(coord)) < 1.0 - 0.6 * np.clip((coord[:, 2] - 1.6) / 1.4, 0, 1)
        for centre in coord[rng.integers(len(coord), size=int(rng.integers(3, 9)))]:
            keep &= np.linalg.norm(coord - centre, axis=1) > rng.uniform(0.15, 0.45)
        coord, normal, obj = coord[keep], normal[keep], obj[keep]
        coord = coord + rng.normal(0, 0.01, coord.shape)
    else:
        coord, normal, obj = room.sample(target)
        if domain == "s3dis":
            coord = coord + rng.normal(0, 0.002, coord.shape)
    # Place the room somewhere other than the origin, like real scans.
    coord = coord + rng.uniform(-3, 3, 3) * np.array([1, 1, 0.1])
    color = _style_colors(domain, room.types, obj, coord - coord.min(0), room.size, rng)
    segment = _label_table(domain, room.types)[obj]
    arrays = {"coord": coord.astype(np.float32), "color": color, "normal": normal.astype(np.float32),
              DATASETS[domain].segment_file[:-4]: segment, "instance": obj.astype(np.int32)}
    if domain == "structured3d":
        del arrays["instance"]
    return arrays


def scene_path(domain: str, index: int, count: int) -> str:
    """Relative folder of scene ``index`` of ``count`` (about 20 % of scenes go to val)."""
    val = index % 5 == 4
    if domain == "scannet":
        return f"{'val' if val else 'train'}/scene{index:04d}_00"
    if domain == "s3dis":
        area = S3DIS_AREAS[index % len(S3DIS_AREAS)]
        return f"{area}/room_{index:03d}"
    # Structured3D: scene ids < 3000 train, 3000-3249 val; two rooms per scene.
    k = index // 5 if val else index - (index + 1) // 5          # position within the split
    return f"{'val' if val else 'train'}/scene_{(3000 if val else 0) + k // 2:05d}/room_{k % 2}"


def generate(out: str | os.PathLike, scenes_per_domain: int = 30, seed: int = 0,
             domains: tuple[str, ...] = DOMAINS) -> list[Path]:
    """Write ``scenes_per_domain`` rooms for EACH domain under ``<out>/<domain>/``.

    Returns the scene folders written. Same ``seed`` -> identical files.
    """
    out = Path(out)
    written = []
    for d in domains:
        for i in range(scenes_per_domain):
            rng = np.random.default_rng([seed, DOMAINS.index(d), i])
            folder = out / d / scene_path(d, i, scenes_per_domain)
            write_scene(folder, make_scene(d, rng))
            written.append(folder)
    return written
