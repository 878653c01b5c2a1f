"""Geometry of synthetic rooms: a shell with openings, furniture made of boxes and cylinders,
and area-weighted surface sampling (vectorised; no Python loop per point).

Objects carry an abstract TYPE ("chair", "bookshelf", ...); ``ppt.data.synthetic`` maps types
to each dataset's class names and styles the points per domain.
"""
from __future__ import annotations

import math

import numpy as np

RECT, DISK = 0, 1


class Room:
    """A rectangular room ``[0, width] x [0, length] x [0, height]`` built from planar patches.

    A patch is a rectangle ``origin + s * u + t * v`` (s, t in [0, 1]) or a disk of centre
    ``origin`` with radius vectors ``u``, ``v``; each has an outward normal and an object id.

    Args:
        rng: generator for placement choices.
        width, length, height: room size in metres.
    """

    def __init__(self, rng: np.random.Generator, width: float, length: float, height: float):
        self.rng, self.size = rng, np.array([width, length, height])
        self.patches: list[tuple] = []       # (kind, origin, u, v, normal, object id)
        self.types: list[str] = []           # object id -> abstract type
        self.holes: list[tuple] = []         # (patch id, s0, s1, t0, t1) cut out of a wall
        self.footprints: list[tuple] = []    # (x0, y0, x1, y1) of floor-standing objects
        self.walls: list[tuple] = []         # (patch id, start, direction, length, inward normal)

    def new_object(self, kind: str) -> int:
        self.types.append(kind)
        return len(self.types) - 1

    def rect(self, obj: int, origin, u, v, normal, kind: int = RECT) -> int:
        normal = np.asarray(normal, float)
        self.patches.append((kind, np.asarray(origin, float), np.asarray(u, float),
                             np.asarray(v, float), normal / np.linalg.norm(normal), obj))
        return len(self.patches) - 1

    def shell(self, ceiling: bool = True) -> None:
        w, l, h = self.size
        self.rect(self.new_object("floor"), (0, 0, 0), (w, 0, 0), (0, l, 0), (0, 0, 1))
        if ceiling:
            self.rect(self.new_object("ceiling"), (0, 0, h), (w, 0, 0), (0, l, 0), (0, 0, -1))
        corners = [((0, 0), (1, 0), w, (0, 1)), ((w, 0), (0, 1), l, (-1, 0)),
                   ((w, l), (-1, 0), w, (0, -1)), ((0, l), (0, -1), l, (1, 0))]
        for start, d, length, n in corners:
            start, d, n = np.array([*start, 0.0]), np.array([*d, 0.0]), np.array([*n, 0.0])
            pid = self.rect(self.new_object("wall"), start, d * length, (0, 0, h), n)
            self.walls.append((pid, start, d, length, n))

    def box(self, obj: int, centre, size, yaw: float = 0.0, bottom: bool = False) -> None:
        """Five (or six with ``bottom``) faces of a box rotated by ``yaw`` about z."""
        c, s = math.cos(yaw), math.sin(yaw)
        axes = np.array([[c, s, 0], [-s, c, 0], [0, 0, 1]], float) * (np.asarray(size, float)[:, None])
        centre = np.asarray(centre, float)
        for a in range(3):
            b, d = axes[(a + 1) % 3], axes[(a + 2) % 3]
            for sign in (1, -1):
                if a == 2 and sign == -1 and not bottom:
                    continue
                face = centre + sign * axes[a] / 2
                self.rect(obj, face - b / 2 - d / 2, b, d, sign * axes[a] / np.linalg.norm(axes[a]))

    def cylinder(self, obj: int, base, radius: float, height: float, sides: int = 10,
                 top: bool = True) -> None:
        base = np.asarray(base, float)
        angles = np.linspace(0, 2 * math.pi, sides + 1)
        ring = np.stack([np.cos(angles), np.sin(angles), np.zeros_like(angles)], 1) * radius
        for i in range(sides):
            mid = (ring[i] + ring[i + 1]) / 2
            self.rect(obj, base + ring[i], ring[i + 1] - ring[i], (0, 0, height), mid / radius)
        if top:
            self.rect(obj, base + (0, 0, height), (radius, 0, 0), (0, radius, 0), (0, 0, 1), DISK)

    # ---- placement -------------------------------------------------------------------------
    def _free(self, x0, y0, x1, y1) -> bool:
        w, l, _ = self.size
        if x0 < 0.02 or y0 < 0.02 or x1 > w - 0.02 or y1 > l - 0.02:
            return False
        return all(x1 <= a0 or x0 >= a1 or y1 <= b0 or y0 >= b1 for a0, b0, a1, b1 in self.footprints)

    def place(self, width: float, depth: float, against_wall: bool, tries: int = 30):
        """Find a free floor spot for a ``width x depth`` footprint (local x = width, local y =
        depth, back at local -y). Returns ``(x, y, yaw)`` of the footprint centre, or None."""
        for _ in range(tries):
            if against_wall:
                _, start, d, length, n = self.walls[self.rng.integers(4)]
                if length < width + 0.1:
                    continue
                along = self.rng.uniform(width / 2 + 0.05, length - width / 2 - 0.05)
                centre = start + d * along + n * (depth / 2 + 0.03)
                yaw = math.atan2(n[1], n[0]) - math.pi / 2       # local +y (front) = inward
            else:
                yaw = self.rng.integers(4) * math.pi / 2
                centre = np.array([self.rng.uniform(0, self.size[0]),
                                   self.rng.uniform(0, self.size[1]), 0.0])
            quarter = round(yaw / (math.pi / 2)) % 2 == 1
            hx, hy = (depth / 2, width / 2) if quarter else (width / 2, depth / 2)
            rect = (centre[0] - hx, centre[1] - hy, centre[0] + hx, centre[1] + hy)
            if self._free(*rect):
                self.footprints.append(rect)
                return centre[0], centre[1], yaw
        return None

    def on_wall(self, obj: int, width: float, height: float, z0: float, thickness: float = 0.0,
                hole: bool = False) -> tuple | None:
        """A flat item on a random wall (door, window, picture...); ``hole`` cuts the wall."""
        for _ in range(10):
            w_id = int(self.rng.integers(4))
            pid, start, d, length, n = self.walls[w_id]
            if length < width + 0.3:
                continue
            along = self.rng.uniform(0.15, length - width - 0.15)
            origin = start + d * along + np.array([0, 0, z0]) + n * max(thickness, 0.01)
            if thickness > 0:
                self.box(obj, origin + d * width / 2 + np.array([0, 0, height / 2]) - n * thickness / 2,
                         (width, thickness, height), math.atan2(d[1], d[0]))
            else:
                self.rect(obj, origin, d * width, (0, 0, height), n)
            if hole:
                self.holes.append((pid, along / length, (along + width) / length,
                                   z0 / self.size[2], (z0 + height) / self.size[2]))
            return w_id, along
        return None

    # ---- sampling --------------------------------------------------------------------------
    def sample(self, n_points: int, density_jitter: float = 0.0) -> tuple[np.ndarray, ...]:
        """Sample about ``n_points`` points over all patches, proportionally to area (times an
        optional log-normal per-object density factor). Returns coord (N, 3), normal (N, 3),
        object id (N,)."""
        kind = np.array([p[0] for p in self.patches])
        origin, u, v, normal = (np.stack([p[i] for p in self.patches]) for i in (1, 2, 3, 4))
        obj = np.array([p[5] for p in self.patches])
        area = np.linalg.norm(np.cross(u, v), axis=1) * np.where(kind == DISK, math.pi, 1.0)
        if density_jitter > 0:
            area = area * np.exp(density_jitter * self.rng.standard_normal(len(self.types)))[obj]
        counts = self.rng.multinomial(n_points, area / area.sum())
        pid = np.repeat(np.arange(len(kind)), counts)
        s, t = self.rng.random((2, len(pid)))
        disk = kind[pid] == DISK
        # Uniform on a disk: radius sqrt(r), angle uniform; mapped onto the u/v radius vectors.
        r, a = np.sqrt(s[disk]), 2 * math.pi * t[disk]
        s[disk], t[disk] = r * np.cos(a), r * np.sin(a)
        coord = origin[pid] + s[:, None] * u[pid] + t[:, None] * v[pid]
        keep = np.ones(len(pid), bool)
        for hole_pid, s0, s1, t0, t1 in self.holes:
            keep &= ~((pid == hole_pid) & (s > s0) & (s < s1) & (t > t0) & (t < t1))
        floor = obj[pid] == self.types.index("floor")
        for x0, y0, x1, y1 in self.footprints:
            inside = (coord[:, 0] > x0) & (coord[:, 0] < x1) & (coord[:, 1] > y0) & (coord[:, 1] < y1)
            keep &= ~(floor & inside)
        # Overhanging parts (clutter on a narrow top) are pressed into the room's box.
        coord = np.clip(coord[keep], 0, self.size)
        return coord, normal[pid][keep], obj[pid][keep]


# ---- furniture: parts in the object's local frame (x = width, y = depth, front = +y) --------
def _legs(w, d, h, t=0.04):
    return [("box", (sx * (w / 2 - t), sy * (d / 2 - t), h / 2), (t, t, h))
            for sx in (-1, 1) for sy in (-1, 1)]


def _bed(r):
    w, d = r.uniform(0.9, 1.8), r.uniform(1.9, 2.1)
    parts = [("box", (0, 0, 0.22), (w, d, 0.44)), ("box", (0, -d / 2 + 0.04, 0.5), (w, 0.08, 1.0))]
    pillows = [("box", (x, -d / 2 + 0.32, 0.5), (min(0.55, w / 2 - 0.05), 0.35, 0.12))
               for x in ((0,) if w < 1.3 else (-w / 4, w / 4))]
    return w, d, 0.9, {"": parts, "pillow": pillows}


def _chair(r):
    w = r.uniform(0.4, 0.5)
    seat, back = ("box", (0, 0, 0.45), (w, w, 0.05)), ("box", (0, -w / 2 + 0.02, 0.7), (w, 0.04, 0.5))
    return w, w, 0.0, {"": [seat, back] + _legs(w, w, 0.43)}


def _table(r):
    w, d, h = r.uniform(0.8, 2.2), r.uniform(0.7, 1.1), r.uniform(0.7, 0.78)
    return w, d, 0.1, {"": [("box", (0, 0, h - 0.02), (w, d, 0.04))] + _legs(w, d, h - 0.04)}


def _desk(r):
    w, d, h = r.uniform(1.0, 1.6), r.uniform(0.6, 0.8), 0.74
    return w, d, 0.9, {"": [("box", (0, 0, h - 0.02), (w, d, 0.04)),
                            ("box", (-w / 2 + 0.02, 0, h / 2), (0.04, d, h)),
                            ("box", (w / 2 - 0.25, 0, h / 2), (0.45, d, h - 0.04))]}


def _sofa(r):
    w, d = r.uniform(1.5, 2.4), r.uniform(0.8, 0.95)
    return w, d, 0.7, {"": [("box", (0, 0.05, 0.21), (w - 0.4, d - 0.1, 0.42)),
                            ("box", (0, -d / 2 + 0.1, 0.45), (w, 0.2, 0.9)),
                            ("box", (-w / 2 + 0.1, 0, 0.3), (0.2, d, 0.6)),
                            ("box", (w / 2 - 0.1, 0, 0.3), (0.2, d, 0.6))]}


def _simple_box(wr, dr, hr, wall):
    def make(r):
        w, d, h = r.uniform(*wr), r.uniform(*dr), r.uniform(*hr)
        return w, d, wall, {"": [("box", (0, 0, h / 2), (w, d, h))]}
    return make


def _bookshelf(r):
    w, d, h = r.uniform(0.8, 1.6), r.uniform(0.3, 0.4), r.uniform(1.5, 2.1)
    parts = [("box", (s * (w / 2 - 0.015), 0, h / 2), (0.03, d, h)) for s in (-1, 1)]
    parts.append(("box", (0, -d / 2 + 0.01, h / 2), (w, 0.02, h)))
    levels = np.linspace(0.05, h - 0.02, int(r.integers(4, 7)))
    parts += [("box", (0, 0, z), (w, d, 0.03)) for z in levels]
    return w, d, 1.0, {"": parts}


def _toilet(r):
    bowl, tank = ("cyl", (0, 0.08, 0), (0.2, 0.2, 0.42)), ("box", (0, -0.25, 0.6), (0.45, 0.2, 0.4))
    return 0.45, 0.7, 1.0, {"": [bowl, tank]}


def _lamp(r):
    h = r.uniform(1.3, 1.7)
    return 0.4, 0.4, 0.3, {"": [("cyl", (0, 0, 0), (0.15, 0.15, 0.03)),
                                ("cyl", (0, 0, 0.03), (0.015, 0.015, h)),
                                ("cyl", (0, 0, h), (0.2, 0.2, 0.3))]}


def _column(r):
    s = r.uniform(0.3, 0.6)
    return s, s, 1.0, {"": [("box", (0, 0, 0), (s, s, -1))]}     # height -1 = floor to ceiling


FURNITURE = {
    "bed": _bed, "chair": _chair, "table": _table, "desk": _desk, "sofa": _sofa, "bookshelf": _bookshelf,
    "cabinet": _simple_box((0.5, 1.2), (0.4, 0.6), (0.7, 2.0), 1.0),
    "refrigerator": _simple_box((0.65, 0.8), (0.65, 0.75), (1.6, 1.9), 1.0),
    "counter": _simple_box((1.2, 2.6), (0.55, 0.65), (0.85, 0.95), 1.0),
    "sink": _simple_box((0.5, 0.7), (0.4, 0.5), (0.8, 0.9), 1.0),
    "bathtub": _simple_box((0.7, 0.8), (1.5, 1.7), (0.5, 0.6), 1.0),
    "nightstand": _simple_box((0.4, 0.5), (0.35, 0.45), (0.45, 0.6), 1.0),
    "dresser": _simple_box((0.9, 1.5), (0.45, 0.55), (0.7, 1.0), 1.0),
    "toilet": _toilet, "lamp": _lamp, "column": _column,
}
# Flat items on walls: (width range, height range, bottom z range, thickness, cuts the wall).
WALL_ITEMS = {
    "door": ((0.8, 1.0), (2.0, 2.1), (0.0, 0.0), 0.0, True),
    "window": ((0.8, 2.0), (0.9, 1.4), (0.8, 1.0), 0.0, True),
    "picture": ((0.3, 1.0), (0.3, 0.8), (1.2, 1.6), 0.03, False),
    "board": ((1.2, 3.0), (0.9, 1.2), (0.8, 1.0), 0.03, False),
    "mirror": ((0.4, 0.8), (0.6, 1.0), (1.0, 1.3), 0.02, False),
    "tv": ((0.8, 1.4), (0.5, 0.8), (1.0, 1.3), 0.06, False),
    "curtain": ((0.5, 1.2), (1.8, 2.2), (0.2, 0.3), 0.05, False),
    "shower_curtain": ((0.7, 1.0), (1.7, 1.9), (0.15, 0.25), 0.04, False),
}


def add_object(room: Room, kind: str, tops: list) -> None:
    """Place one object of abstract type ``kind``; flat-topped furniture is added to ``tops``
    (x0, y0, x1, y1, z) so clutter can stand on it."""
    r, height = room.rng, room.size[2]
    if kind in WALL_ITEMS:
        wr, hr, zr, thick, hole = WALL_ITEMS[kind]
        room.on_wall(room.new_object(kind), r.uniform(*wr), min(r.uniform(*hr), height - 0.1),
                     r.uniform(*zr), thick, hole)
    elif kind == "beam":
        along_x = r.random() < 0.5
        pos, span = r.uniform(0.5, room.size[1 if along_x else 0] - 0.5), room.size[0 if along_x else 1]
        w, h = r.uniform(0.2, 0.4), r.uniform(0.3, 0.5)
        centre = (span / 2, pos, height - h / 2) if along_x else (pos, span / 2, height - h / 2)
        room.box(room.new_object("beam"), centre, (span, w, h) if along_x else (w, span, h), bottom=True)
    elif kind == "clutter":
        w, d, h = r.uniform(0.1, 0.45, size=3)
        if tops and r.random() < 0.7:
            x0, y0, x1, y1, z = tops[int(r.integers(len(tops)))]
            cx = np.clip(r.uniform(x0, x1), x0 + w / 2, max(x0 + w / 2, x1 - w / 2))
            cy = np.clip(r.uniform(y0, y1), y0 + d / 2, max(y0 + d / 2, y1 - d / 2))
            room.box(room.new_object(kind), (cx, cy, z + h / 2), (w, d, h))
        elif (spot := room.place(w, d, r.random() < 0.6)) is not None:
            room.box(room.new_object(kind), (spot[0], spot[1], h / 2), (w, d, h), spot[2])
    else:
        w, d, wall_prob, groups = FURNITURE[kind](r)
        spot = room.place(w, d, r.random() < wall_prob)
        if spot is None:
            return
        x, y, yaw = spot
        c, s = math.cos(yaw), math.sin(yaw)
        rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
        for sub, parts in groups.items():
            obj = room.new_object(sub or kind)
            for shape, centre, size in parts:
                centre = np.array([x, y, 0]) + rot @ np.asarray(centre, float)
                if shape == "cyl":
                    room.cylinder(obj, centre, size[0], size[2])
                elif size[2] < 0:
                    room.box(obj, centre + (0, 0, height / 2), (size[0], size[1], height), yaw)
                else:
                    room.box(obj, centre, size, yaw)
        if kind in ("table", "desk", "cabinet", "nightstand", "dresser", "counter"):
            top = max(c[2] + s[2] / 2 for shape, c, s in groups[""])
            fx0, fy0, fx1, fy1 = room.footprints[-1]
            tops.append((fx0 + 0.05, fy0 + 0.05, fx1 - 0.05, fy1 - 0.05, top))
