"""ScanNet v2 raw scans -> ``{split}/<scene>/{coord,color,normal,segment20,segment200,instance}.npy``.

Raw inputs per scene (official layout, ``scans/<scene>/`` and ``scans_test/<scene>/``):

- ``<scene>_vh_clean_2.ply``: vertices x, y, z (float) + red, green, blue, alpha (uchar),
  faces ``vertex_indices`` (binary or ASCII PLY);
- ``<scene>_vh_clean_2.0.010000.segs.json``: ``segIndices``, one over-segment id per vertex;
- ``<scene>.aggregation.json``: ``segGroups`` [{objectId, segments, label (raw category)}];
- ``<scene>.txt``: ``axisAlignment = 16 floats`` (row-major 4x4), used with ``align=True``.

Plus ``scannetv2-labels.combined.tsv`` (columns ``id``, ``raw_category``, ``nyu40id`` ...) and
the official split lists ``scannetv2_{train,val,test}.txt`` (1201 / 312 / 100 scenes). The
download does not hold the lists (they live in the ScanNet code repository, ``Tasks/Benchmark/``),
so a copy ships with this package in ``meta/`` and is used unless ``--splits DIR`` or the raw
folder provides its own.

Labels: raw category -> NYU40 id -> 20-class index (``classes.SCANNET20_NYU40``), and raw
category -> TSV ``id`` -> ScanNet200 index (position in ``scannet200.VALID_CLASS_IDS_200``, the
benchmark's 200 ids in its label order); everything else is -1. ``instance`` = aggregation
``objectId``, -1 where unannotated. Test scans have no annotations: coord/color/normal only.
Normals: area-weighted vertex normals of the mesh (face cross products summed onto vertices).
"""
from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import numpy as np

from ppt.data.classes import IGNORE_INDEX, SCANNET20_NYU40
from ppt.data.preprocess.common import SceneTask
from ppt.data.scannet200 import VALID_CLASS_IDS_200

SPLITS = ("train", "val", "test")
# The official ScanNet v2 split lists, shipped with the package (see meta/README.md).
PACKAGED_SPLITS = Path(__file__).resolve().parent / "meta"
_MAX_NAMED = 20  # scene names spelt out in one "not in any split list" warning


def _lookup(ids: tuple[int, ...]) -> np.ndarray:
    """Table ``t`` with ``t[raw id] = label index`` (-1 elsewhere)."""
    table = np.full(max(ids) + 1, IGNORE_INDEX, dtype=np.int64)
    table[list(ids)] = np.arange(len(ids))
    return table


NYU40_TO_20 = _lookup(SCANNET20_NYU40)
ID_TO_200 = _lookup(VALID_CLASS_IDS_200)


def read_label_map(tsv: Path) -> dict[str, tuple[int, int]]:
    """``scannetv2-labels.combined.tsv`` -> {raw_category: (nyu40id, id)}."""
    with open(tsv, newline="") as f:
        reader = csv.DictReader(f, delimiter="\t")
        missing = {"raw_category", "nyu40id", "id"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{tsv}: missing column(s) {sorted(missing)}; is this "
                             f"scannetv2-labels.combined.tsv?")
        table = {}
        for row in reader:
            nyu = int(row["nyu40id"]) if row["nyu40id"].strip() else 0
            table[row["raw_category"]] = (nyu, int(row["id"]))
    return table


def read_mesh(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Read a ScanNet PLY mesh.

    Returns:
        coord float32 (N, 3), color uint8 (N, 3), faces int64 (F, 3).
    """
    from plyfile import PlyData, PlyElementParseError

    with open(path, "rb") as f:
        try:
            # Declaring triangles lets plyfile map the binary face list in one numpy read
            # instead of one Python call per face (~10x faster on a 300k-face scan).
            ply = PlyData.read(f, known_list_len={"face": {"vertex_indices": 3}})
        except PlyElementParseError:  # not all faces are triangles: generic reader
            f.seek(0)
            ply = PlyData.read(f)
        v = ply["vertex"]
        coord = np.stack([v["x"], v["y"], v["z"]], axis=1).astype(np.float32)
        color = np.stack([v["red"], v["green"], v["blue"]], axis=1).astype(np.uint8)
        faces = ply["face"]["vertex_indices"]
        if faces.dtype == object:  # ASCII file or generic reader: one array per face
            lengths = {len(face) for face in faces}
            if lengths - {3}:
                raise ValueError(f"{path}: expected triangle faces, found faces with "
                                 f"{sorted(lengths - {3})} vertices")
            faces = np.stack(faces) if len(faces) else np.zeros((0, 3), np.int64)
        faces = np.array(faces, dtype=np.int64)
    return coord, color, faces


def vertex_normals(coord: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Area-weighted vertex normals (N, 3) float32; the face winding decides the side.

    The unnormalised cross product of a face has length 2 * area, so summing it onto the
    face's vertices weights each face by its area. Vertices in no face get (0, 0, 0).
    """
    p = coord.astype(np.float64)
    face_normal = np.cross(p[faces[:, 1]] - p[faces[:, 0]], p[faces[:, 2]] - p[faces[:, 0]])
    index = faces.reshape(-1)
    normal = np.stack([np.bincount(index, np.repeat(face_normal[:, k], 3), minlength=len(p))
                       for k in range(3)], axis=1)
    length = np.linalg.norm(normal, axis=1, keepdims=True)
    return np.divide(normal, length, out=np.zeros_like(normal), where=length > 0).astype(np.float32)


def read_axis_alignment(path: Path) -> np.ndarray:
    """``axisAlignment = 16 floats`` line of ``<scene>.txt`` -> (4, 4) matrix."""
    for line in path.read_text().splitlines():
        if line.strip().startswith("axisAlignment"):
            values = np.array(line.split("=", 1)[1].split(), dtype=np.float64)
            if values.size != 16:
                raise ValueError(f"{path}: axisAlignment has {values.size} numbers, expected 16")
            return values.reshape(4, 4)
    raise ValueError(f"{path}: no 'axisAlignment = ...' line")


def read_labels(scene_dir: Path, scene: str, n: int, label_map: dict[str, tuple[int, int]],
                ) -> dict[str, np.ndarray]:
    """Per-vertex segment20, segment200 and instance from the segs + aggregation files."""
    segs_path = scene_dir / f"{scene}_vh_clean_2.0.010000.segs.json"
    agg_path = scene_dir / f"{scene}.aggregation.json"
    seg_ids = np.asarray(json.loads(segs_path.read_text())["segIndices"], dtype=np.int64)
    if len(seg_ids) != n:
        raise ValueError(f"{segs_path}: {len(seg_ids)} segIndices but the mesh has {n} vertices")
    groups = json.loads(agg_path.read_text())["segGroups"]
    # Map each over-segment id to (nyu40, id200, objectId) through a compact table.
    unique, inverse = np.unique(seg_ids, return_inverse=True)
    position = {int(s): i for i, s in enumerate(unique)}
    nyu = np.zeros(len(unique), np.int64)
    raw200 = np.zeros(len(unique), np.int64)
    obj = np.full(len(unique), IGNORE_INDEX, np.int64)
    unknown = set()
    for group in groups:
        label = group["label"]
        if label not in label_map:
            unknown.add(label)
        nyu40, id200 = label_map.get(label, (0, 0))
        for s in group["segments"]:
            i = position.get(int(s))
            if i is not None:  # an aggregation segment no vertex uses: nothing to label
                nyu[i], raw200[i], obj[i] = nyu40, id200, int(group["objectId"])
    if unknown:
        warnings.warn(f"{agg_path}: raw categories not in the label TSV, left unlabelled: "
                      f"{sorted(unknown)}")
    seg20 = np.where(nyu < len(NYU40_TO_20), NYU40_TO_20[np.minimum(nyu, len(NYU40_TO_20) - 1)],
                     IGNORE_INDEX)
    seg200 = np.where(raw200 < len(ID_TO_200), ID_TO_200[np.minimum(raw200, len(ID_TO_200) - 1)],
                      IGNORE_INDEX)
    return {"segment20": seg20[inverse].astype(np.int16),
            "segment200": seg200[inverse].astype(np.int16),
            "instance": obj[inverse].astype(np.int16)}


def process(task: SceneTask) -> dict[str, np.ndarray]:
    """Convert one scan; ``task.inputs = (scene_dir, tsv or None, align)``."""
    scene_dir, tsv, align = task.inputs
    scene = scene_dir.name
    coord, color, faces = read_mesh(scene_dir / f"{scene}_vh_clean_2.ply")
    normal = vertex_normals(coord, faces)
    if align:
        matrix = read_axis_alignment(scene_dir / f"{scene}.txt")
        coord = (coord.astype(np.float64) @ matrix[:3, :3].T + matrix[:3, 3]).astype(np.float32)
        normal = (normal @ matrix[:3, :3].T).astype(np.float32)
    arrays = {"coord": coord, "color": color, "normal": normal}
    if tsv is not None:
        arrays.update(read_labels(scene_dir, scene, len(coord), _label_map(tsv)))
    return arrays


_LABEL_MAPS: dict[Path, dict] = {}


def _label_map(tsv: Path) -> dict[str, tuple[int, int]]:
    # Read once per worker process, not once per scene.
    if tsv not in _LABEL_MAPS:
        _LABEL_MAPS[tsv] = read_label_map(tsv)
    return _LABEL_MAPS[tsv]


def _find(raw: Path, names: tuple[str, ...], extra: Path | None) -> Path | None:
    for folder in [p for p in (extra, raw, raw / "meta", raw / "meta_data", raw / "tasks")
                   if p is not None]:
        for name in names:
            if (folder / name).is_file():
                return folder / name
    return None


def find_split_lists(raw: Path, splits_dir: Path | None = None) -> Path:
    """Folder whose ``scannetv2_{train,val,test}.txt`` decide the splits.

    ``splits_dir`` when given (it must hold the train and val lists); else the first of ``raw``,
    ``raw/meta``, ``raw/meta_data``, ``raw/tasks`` holding ``scannetv2_train.txt`` (lists the
    user put beside the download, as the reference expects); else the packaged official lists.
    All lists come from that one folder: train from one place and val from another could put a
    scene in two splits.
    """
    if splits_dir is not None:
        folder = Path(splits_dir)
    else:
        found = _find(Path(raw), ("scannetv2_train.txt",), None)
        folder = found.parent if found is not None else PACKAGED_SPLITS
    for split in ("train", "val"):
        if not (folder / f"scannetv2_{split}.txt").is_file():
            raise FileNotFoundError(f"{folder / f'scannetv2_{split}.txt'} not found; the split lists "
                                    f"scannetv2_{{train,val,test}}.txt must sit side by side"
                                    + ("" if splits_dir is not None else "; pass --splits DIR"))
    return folder


def read_split_lists(folder: Path) -> dict[str, str]:
    """{scene: split} from ``folder/scannetv2_{train,val,test}.txt`` (test optional)."""
    listed: dict[str, str] = {}
    for split in SPLITS:
        path = folder / f"scannetv2_{split}.txt"
        if not path.is_file():
            continue
        for scene in path.read_text().split():
            if scene in listed and listed[scene] != split:
                raise ValueError(f"{path}: {scene} is also listed in scannetv2_{listed[scene]}.txt")
            listed[scene] = split
    return listed


def list_tasks(raw: Path, out: Path, splits_dir: Path | None = None, align: bool = False,
               ) -> list[SceneTask]:
    """One task per scan of ``scans/`` and ``scans_test/``, split by the split lists.

    A scan in no list goes to ``train`` (``scans/``, annotated) or ``test`` (``scans_test/``),
    with one warning per folder naming the scans.

    Args:
        raw: ScanNet root holding ``scans/`` (and optionally ``scans_test/``).
        out: output root; scenes go to ``out/{split}/<scene>``.
        splits_dir: folder with ``scannetv2_{train,val,test}.txt`` (and possibly the label
            TSV); default: see ``find_split_lists`` (the packaged official lists unless the raw
            folder has its own).
        align: apply each scan's ``axisAlignment``.
    """
    raw, out = Path(raw), Path(out)
    if not (raw / "scans").is_dir():
        raise FileNotFoundError(f"{raw / 'scans'}: not found; --raw must be the ScanNet root "
                                f"holding scans/ and scans_test/")
    tsv = _find(raw, ("scannetv2-labels.combined.tsv",), splits_dir)
    if tsv is None:
        raise FileNotFoundError(f"scannetv2-labels.combined.tsv not found in {raw} or its "
                                f"meta/ folder; copy it from the ScanNet download")
    listed = read_split_lists(find_split_lists(raw, splits_dir))
    tasks = []
    for folder, annotated, fallback in (("scans", True, "train"), ("scans_test", False, "test")):
        unlisted = []
        for scene_dir in sorted((raw / folder).glob("scene*")):
            if not scene_dir.is_dir():
                continue
            split = listed.get(scene_dir.name)
            if split is None:
                unlisted.append(scene_dir.name)
                split = fallback
            tasks.append(SceneTask(f"{split}/{scene_dir.name}", out / split / scene_dir.name, split,
                                   (scene_dir, tsv if annotated else None, align)))
        if unlisted:
            named = ", ".join(unlisted[:_MAX_NAMED])
            more = f" and {len(unlisted) - _MAX_NAMED} more" if len(unlisted) > _MAX_NAMED else ""
            warnings.warn(f"{raw / folder}: {len(unlisted)} scan(s) in no split list, converted into "
                          f"{fallback}/: {named}{more}")
    return tasks
