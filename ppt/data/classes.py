"""Class-name lists of each dataset, in label order, and the union label space.

Each dataset declares its own names; everything else (union head, text embeddings,
raw-label mapping) is derived from these lists, never from hand-kept index tables.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ppt.data.scannet200 import (
    CLASS_LABELS_200, COMMON_CATS_SCANNET_200, HEAD_CATS_SCANNET_200, TAIL_CATS_SCANNET_200,
)

IGNORE_INDEX = -1

# ScanNet v2, 20 classes: NYU40 ids in label order (SPEC §1).
SCANNET20_NYU40 = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 14, 16, 24, 28, 33, 34, 36, 39)
SCANNET20 = (
    "wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window", "bookshelf",
    "picture", "counter", "desk", "curtain", "refrigerator", "shower curtain", "toilet", "sink",
    "bathtub", "otherfurniture",
)

S3DIS13 = (
    "ceiling", "floor", "wall", "beam", "column", "window", "door", "table", "chair", "sofa",
    "bookcase", "board", "clutter",
)

# Structured3D, 25 classes: NYU40 ids in label order (SPEC §1).
STRUCTURED3D25_NYU40 = (
    1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 14, 15, 16, 17, 18, 19, 22, 24, 25, 32, 34, 35, 38, 39, 40,
)
STRUCTURED3D25 = (
    "wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window", "picture",
    "desk", "shelves", "curtain", "dresser", "pillow", "mirror", "ceiling", "refrigerator",
    "television", "nightstand", "sink", "lamp", "otherstructure", "otherfurniture", "otherprop",
)


@dataclass(frozen=True)
class DatasetInfo:
    """Static description of a dataset's label space and preprocessed layout.

    Attributes:
        name: short name used on the command line (``scannet``).
        class_names: names in label order; label ``i`` means ``class_names[i]``.
        splits: split name -> folder globs relative to the dataset root, each matching
            scene folders (``"train/*"``, ``"Area_5/*"``).
        segment_file: the ``.npy`` that holds the labels in this label space.
        ignore_index: the value in ``segment_file`` that means "no label" (read as -1).
        has_color: the scenes carry colour (a user's colourless scans: false).
        source: where the data came from (a user's ``dataset.yaml`` note).
        groups: named groups of classes for reports (ScanNet200's head / common / tail).
        folder: the folder under the data root holding the scenes; "" = ``name`` (ScanNet200
            reads the ``scannet`` folder: the same scenes, another label file).
    """

    name: str
    class_names: tuple[str, ...]
    splits: dict[str, tuple[str, ...]]
    segment_file: str = "segment.npy"
    ignore_index: int = IGNORE_INDEX
    has_color: bool = True
    source: str = ""
    groups: dict[str, tuple[str, ...]] = field(default_factory=dict)
    folder: str = ""

    @property
    def folder_name(self) -> str:
        """The dataset's folder under a data root."""
        return self.folder or self.name

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


S3DIS_AREAS = tuple(f"Area_{i}" for i in range(1, 7))

DATASETS: dict[str, DatasetInfo] = {
    "scannet": DatasetInfo(
        "scannet", SCANNET20,
        {"train": ("train/*",), "val": ("val/*",), "test": ("test/*",)},
        segment_file="segment20.npy",
    ),
    # ScanNet200 (SPEC §10): the same scenes, labels of the 200-class benchmark.
    "scannet200": DatasetInfo(
        "scannet200", CLASS_LABELS_200,
        {"train": ("train/*",), "val": ("val/*",), "test": ("test/*",)},
        segment_file="segment200.npy", folder="scannet",
        groups={"head": HEAD_CATS_SCANNET_200, "common": COMMON_CATS_SCANNET_200,
                "tail": TAIL_CATS_SCANNET_200},
    ),
    "s3dis": DatasetInfo(
        "s3dis", S3DIS13,
        # Reference protocol: Area 5 held out for validation.
        {"train": tuple(f"{a}/*" for a in S3DIS_AREAS if a != "Area_5"), "val": ("Area_5/*",),
         "test": ("Area_5/*",)},
    ),
    "structured3d": DatasetInfo(
        "structured3d", STRUCTURED3D25,
        {"train": ("train/*/*",), "val": ("val/*/*",), "test": ("test/*/*",)},
    ),
}


def union_label_space(class_lists: dict[str, tuple[str, ...]]) -> tuple[tuple[str, ...], dict[str, list[int]]]:
    """Merge several label spaces by class name.

    Args:
        class_lists: dataset name -> class names in that dataset's label order.

    Returns:
        ``(union_names, index)``: the union in first-seen order (no duplicates) and, per
        dataset, ``index[d][i]`` = position of the dataset's class ``i`` in the union.
    """
    union: list[str] = []
    position: dict[str, int] = {}
    index: dict[str, list[int]] = {}
    for dataset, names in class_lists.items():
        index[dataset] = []
        for name in names:
            if name not in position:
                position[name] = len(union)
                union.append(name)
            index[dataset].append(position[name])
    return tuple(union), index
