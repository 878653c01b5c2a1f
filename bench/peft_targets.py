"""The PEFT study's targets: where the base trains, where each stage adapts, where the sweep scores.

A target is three data roots made of symlinks (nothing is copied except the colour probe's
recoloured ``color.npy``):

- ``base_root`` / ``base_mix``: what the base model trains on;
- ``root``: the reported runs: the target's ``train`` split is what a stage adapts on, its
  ``val`` split is where the study reports (never used to choose anything);
- ``held_out``: the lr sweep: a ``train`` split inside ``root``'s train split and a ``val``
  split held out of that training (also inside ``root``'s train split).

``synthetic``: synthetic S3DIS (13 classes) from a base trained on synthetic Structured3D +
ScanNet (2:1): a domain the base never trained on. Runs train on Areas 1-4, 6 and report on Area 5;
the sweep trains on Areas 1-3, 6 and scores on Area 4.

``colour``: the same scenes seen through another sensor (colour 255 - (B, R, G)).

``real``: real ScanNet v2 rooms (``bench/real_scans.py``). The base trains on the synthetic
Structured3D and S3DIS domains plus the real scans of the first ``BASE_ROOMS`` rooms (all rescans
of a room stay together); the stages adapt to the scans of the remaining training rooms, whose
labels the base never saw; the sweep trains on the first of those rooms and scores on the last
``HELD_OUT_ROOMS``; the study reports on the real val scans (rooms no run trained on).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

TARGETS = ("synthetic", "colour", "real")
SWEEP_TRAIN, SWEEP_VAL = ("Area_1", "Area_2", "Area_3", "Area_6"), "Area_4"
SYNTHETIC_BASE_MIX = "{structured3d: 2, scannet: 1}"
REAL_BASE_MIX = "{scannet: 1, structured3d: 1, s3dis: 1}"
BASE_ROOMS, HELD_OUT_ROOMS = 3, 2
# the demo's 10 cm voxel as on the synthetic target (5 cm costs ~3x per step: the study's ~110 runs
# would not fit two cores in a session); a long epoch so that the step cap, not the 7 base
# scans, ends the base's run
REAL_BASE_OVERRIDES = ("data.loop=1000",)


@dataclass
class Target:
    name: str        # synthetic | colour | real
    dataset: str     # the dataset name the stages adapt to
    root: Path       # the reported runs (train: adaptation scenes, val: reported scenes)
    held_out: Path   # the lr sweep (train and val both inside root's train split)
    base_root: Path  # what the base trains on
    base_mix: str
    splits: dict     # split name -> scene names, for the study's JSON
    base_overrides: tuple = ()  # the base's config overrides besides data and mix


def _link(src: Path, dst: Path) -> None:
    if not src.exists():  # a small root without that area
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not os.path.lexists(dst):
        os.symlink(src.resolve(), dst)


def _synthetic_sweep_root(root: Path, out: Path) -> Path:
    """A data root whose S3DIS train split is SWEEP_TRAIN and whose val split (``Area_5``) is
    SWEEP_VAL."""
    where = out / "sweep_root"
    for area in SWEEP_TRAIN:
        _link(root / "s3dis" / area, where / "s3dis" / area)
    _link(root / "s3dis" / SWEEP_VAL, where / "s3dis" / "Area_5")
    return where


def _colour_root(root: Path, out: Path) -> Path:
    """S3DIS scenes with colour 255 - (B, R, G): a sensor shift no base domain has (every other
    file a symlink; written once, atomically per scene)."""
    import numpy as np

    where = out / "shifted_root"
    for scene in sorted((root / "s3dis").glob("Area_*/*")):
        dst = where / "s3dis" / scene.parent.name / scene.name
        if (dst / "color.npy").is_file():
            continue
        dst.mkdir(parents=True, exist_ok=True)
        for f in scene.iterdir():
            if f.name != "color.npy" and not (dst / f.name).exists():
                os.symlink(f.resolve(), dst / f.name)
        color = np.load(scene / "color.npy")
        np.save(dst / "color.tmp.npy", (255 - color[:, [2, 0, 1]]).astype(np.uint8))
        os.replace(dst / "color.tmp.npy", dst / "color.npy")
    return where


def rooms(scans: list[str]) -> list[list[str]]:
    """Scans grouped by room (``sceneXXXX_YY`` -> ``sceneXXXX``), rooms in id order."""
    by_room: dict[str, list[str]] = {}
    for scan in sorted(scans):
        by_room.setdefault(scan.rsplit("_", 1)[0], []).append(scan)
    return [by_room[r] for r in sorted(by_room)]


def _real_target(real: Path, synthetic: Path, out: Path) -> Target:
    train = rooms([p.name for p in (real / "scannet" / "train").iterdir() if p.is_dir()])
    val = sorted(p.name for p in (real / "scannet" / "val").iterdir() if p.is_dir())
    if len(train) < BASE_ROOMS + HELD_OUT_ROOMS + 1 or not val:
        raise ValueError(f"{real}: needs >= {BASE_ROOMS + HELD_OUT_ROOMS + 1} training rooms and val scans "
                         f"(bench/real_scans.py writes 8 and 6)")
    base = [s for room in train[:BASE_ROOMS] for s in room]
    sweep_train = [s for room in train[BASE_ROOMS:-HELD_OUT_ROOMS] for s in room]
    sweep_val = [s for room in train[-HELD_OUT_ROOMS:] for s in room]
    src = real / "scannet"
    roots = {"base": out / "real_base_root", "target": out / "real_root", "held_out": out / "real_sweep_root"}
    for scan in base:
        _link(src / "train" / scan, roots["base"] / "scannet" / "train" / scan)
    for scan in val:  # the base does not validate; the folder keeps the layout whole
        _link(src / "val" / scan, roots["base"] / "scannet" / "val" / scan)
        _link(src / "val" / scan, roots["target"] / "scannet" / "val" / scan)
    for name in ("structured3d", "s3dis"):
        _link(synthetic / name, roots["base"] / name)
    for scan in sweep_train + sweep_val:
        _link(src / "train" / scan, roots["target"] / "scannet" / "train" / scan)
    for scan in sweep_train:
        _link(src / "train" / scan, roots["held_out"] / "scannet" / "train" / scan)
    for scan in sweep_val:
        _link(src / "train" / scan, roots["held_out"] / "scannet" / "val" / scan)
    splits = {"base": base, "adapt": sweep_train + sweep_val, "sweep_train": sweep_train, "sweep_val": sweep_val,
              "reported_val": val}
    return Target("real", "scannet", roots["target"], roots["held_out"], roots["base"], REAL_BASE_MIX, splits,
                  REAL_BASE_OVERRIDES)


def build_target(name: str, synthetic: Path, real: Path | None, out: Path) -> Target:
    """The roots of target ``name`` under ``out`` (made once; later calls reuse them)."""
    if name == "real":
        if real is None or not (real / "scannet" / "train").is_dir():
            raise ValueError(f"--real {real}: no real ScanNet scans (python bench/real_scans.py --snapshot "
                             f"<votenet git dir> --out data/real)")
        return _real_target(real, synthetic, out)
    root = _colour_root(synthetic, out) if name == "colour" else synthetic
    splits = {"adapt": [a for a in (*SWEEP_TRAIN, SWEEP_VAL)], "sweep_train": list(SWEEP_TRAIN),
              "sweep_val": [SWEEP_VAL], "reported_val": ["Area_5"]}
    return Target(name, "s3dis", root, _synthetic_sweep_root(root, out), synthetic, SYNTHETIC_BASE_MIX, splits)
