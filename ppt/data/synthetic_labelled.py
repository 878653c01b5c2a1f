"""A user-like folder of labelled office scans: binary PLY files as CloudCompare exports them.

``write_labelled_plys(out, scenes, seed)`` writes ``<out>/<room>_<i>.ply`` (vertex ``x, y, z``
float32, ``red, green, blue`` uchar, float ``scalar_Label``) and ``<out>/classes.txt`` with a
label set of its own (:data:`LABELLED_CLASSES`): shared names (floor, wall, door ...) next to
ones no built-in dataset has (swivel chair, screen, shelving, filing cabinet, other), so
their text embeddings are new to a model trained on the built-in datasets. It is the input
``tools/preprocess.py labelled`` expects from a user, so the whole "train on my own data" path
runs without a download. The rooms come from ``ppt.data.synthetic_rooms``: offices and
meeting rooms with desks carrying monitors, swivel chairs (pole and star base, unlike the
four-legged chairs of the built-in domains), shelves, cabinets and whiteboards; a terrestrial
laser scanner's look (3 mm noise, neutral colours, a ceiling). Every office holds every class.
Each room uses its own ``np.random.default_rng([seed, 7, i])``: same seed -> same files.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from ppt.data.synthetic import BASE_COLOR
from ppt.data.synthetic_rooms import Room, add_object

LABELLED_CLASSES = ("floor", "wall", "ceiling", "door", "window", "desk", "swivel chair", "shelving",
                    "screen", "filing cabinet", "whiteboard", "other")
# Abstract object type (synthetic_rooms, plus this module's "office_chair" and "monitor") -> class.
TYPE_TO_CLASS = {"floor": "floor", "wall": "wall", "ceiling": "ceiling", "door": "door", "window": "window",
                 "desk": "desk", "table": "desk", "office_chair": "swivel chair", "bookshelf": "shelving",
                 "monitor": "screen", "cabinet": "filing cabinet", "board": "whiteboard", "clutter": "other"}
COLORS = {**BASE_COLOR, "office_chair": (45, 45, 50), "monitor": (25, 25, 28), "board": (240, 240, 238)}
# (room type, size ranges (w, l, h), {type: (min, max) count}); office_chair / monitor placed here.
OFFICE = ("office", ((3.5, 7), (3.5, 7), (2.6, 3.1)),
          {"desk": (1, 4), "office_chair": (1, 4), "bookshelf": (1, 2), "cabinet": (1, 2), "board": (1, 1),
           "door": (1, 1), "window": (1, 2), "clutter": (2, 6)})
MEETING = ("meeting", ((4.5, 8), (4, 6.5), (2.7, 3.2)),
           {"table": (1, 1), "office_chair": (4, 8), "board": (1, 2), "cabinet": (0, 1),
            "door": (1, 2), "window": (0, 2), "clutter": (1, 4)})
POINTS = (20_000, 40_000)
NOISE = 0.003


def _office_chair(room: Room) -> None:
    """A swivel chair: seat, back, pole and a five-armed base; free-standing."""
    spot = room.place(0.6, 0.6, against_wall=False)
    if spot is None:
        return
    x, y, yaw = spot
    obj = room.new_object("office_chair")
    c, s = math.cos(yaw), math.sin(yaw)
    back = np.array([x, y, 0]) + np.array([-s, c, 0]) * -0.22
    room.box(obj, (x, y, 0.47), (0.48, 0.48, 0.07), yaw)
    room.box(obj, back + (0, 0, 0.8), (0.46, 0.05, 0.55), yaw)
    room.cylinder(obj, (x, y, 0.08), 0.025, 0.35, sides=6, top=False)
    for k in range(5):
        a = yaw + 2 * math.pi * k / 5
        room.box(obj, (x + 0.15 * math.cos(a), y + 0.15 * math.sin(a), 0.06), (0.3, 0.04, 0.04), a)


def _monitor(room: Room, top: tuple) -> None:
    """A screen on a stand on a desk top ``(x0, y0, x1, y1, z)``, facing along its short side."""
    x0, y0, x1, y1, z = top
    r = room.rng
    along_x = (x1 - x0) >= (y1 - y0)
    w, h = r.uniform(0.45, 0.65), r.uniform(0.3, 0.4)
    cx = r.uniform(x0 + w / 2, max(x0 + w / 2, x1 - w / 2)) if along_x else (x0 + x1) / 2
    cy = (y0 + y1) / 2 if along_x else r.uniform(y0 + w / 2, max(y0 + w / 2, y1 - w / 2))
    yaw = 0.0 if along_x else math.pi / 2
    obj = room.new_object("monitor")
    room.box(obj, (cx, cy, z + 0.01), (0.22, 0.18, 0.02), yaw)
    room.box(obj, (cx, cy, z + 0.08), (0.04, 0.04, 0.14), yaw)
    room.box(obj, (cx, cy, z + 0.15 + h / 2), (w, 0.03, h), yaw)


def make_room(rng: np.random.Generator, office: bool = True) -> dict[str, np.ndarray]:
    """One labelled room: ``coord`` float32 (N, 3), ``color`` uint8 (N, 3), ``label`` int (N,)
    (index into :data:`LABELLED_CLASSES`)."""
    _, sizes, recipe = OFFICE if office else MEETING
    room = Room(rng, *(rng.uniform(lo, hi) for lo, hi in sizes))
    room.shell(ceiling=True)
    tops: list = []
    work_tops: list = []
    for kind in sorted(recipe, key=lambda k: k == "clutter"):   # clutter last: it stands on tops
        lo, hi = recipe[kind]
        for _ in range(int(rng.integers(lo, hi + 1))):
            if kind == "office_chair":
                _office_chair(room)
                continue
            before = len(tops)
            add_object(room, kind, tops)
            if kind in ("desk", "table"):
                work_tops += tops[before:]
    for i, top in enumerate(work_tops):
        if i == 0 or rng.random() < 0.7:
            _monitor(room, top)
    coord, _, obj = room.sample(int(rng.integers(*POINTS)))
    coord = coord + rng.normal(0, NOISE, coord.shape) + rng.uniform(-5, 5, 3) * np.array([1, 1, 0])
    base = np.array([COLORS[t] for t in room.types], np.float32)
    grey = base.mean(1, keepdims=True)
    inst = (0.6 * base + 0.4 * grey) + rng.normal(0, 12, base.shape)       # muted, per instance
    color = inst[obj] * rng.uniform(0.85, 1.05) + rng.normal(0, 5, (len(obj), 3))
    index = {c: i for i, c in enumerate(LABELLED_CLASSES)}
    table = np.array([index[TYPE_TO_CLASS[t]] for t in room.types])
    return {"coord": coord.astype(np.float32), "color": np.clip(color, 0, 255).round().astype(np.uint8),
            "label": table[obj]}


def write_ply(path: Path, room: dict[str, np.ndarray]) -> Path:
    """Binary little-endian PLY as CloudCompare writes it: x, y, z, red, green, blue, scalar_Label."""
    from plyfile import PlyData, PlyElement

    from ppt.io import atomic_write

    vertex = np.empty(len(room["coord"]), [("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("red", "u1"),
                                           ("green", "u1"), ("blue", "u1"), ("scalar_Label", "<f4")])
    for i, axis in enumerate("xyz"):
        vertex[axis] = room["coord"][:, i]
    for i, channel in enumerate(("red", "green", "blue")):
        vertex[channel] = room["color"][:, i]
    vertex["scalar_Label"] = room["label"]
    ply = PlyData([PlyElement.describe(vertex, "vertex")], byte_order="<")
    return atomic_write(path, ply.write)


def write_labelled_plys(out: str | os.PathLike, scenes: int = 12, seed: int = 0) -> list[Path]:
    """Write ``scenes`` labelled rooms (two offices to every meeting room) and ``classes.txt``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for i in range(scenes):
        office = i % 3 != 2
        room = make_room(np.random.default_rng([seed, 7, i]), office)
        written.append(write_ply(out / f"{'office' if office else 'meeting'}_{i:02d}.ply", room))
    (out / "classes.txt").write_text("# label order of scalar_Label (0 first)\n" + "\n".join(LABELLED_CLASSES) + "\n")
    return written
