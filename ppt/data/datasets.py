"""Scene datasets over the preprocessed layout (real and synthetic data alike).

Layouts (see ``ppt.data.classes.DATASETS`` for the split globs)::

    <root>/{train,val,test}/<scene>/{coord,color,normal,segment20,instance}.npy   scannet
    <root>/Area_N/<room>/{coord,color,normal,segment,instance}.npy                s3dis
    <root>/{train,val,test}/scene_XXXXX/room_Y/{coord,color,normal,segment}.npy   structured3d
    <root>/<split>/<scene>/{coord,color,[normal],segment}.npy                     FolderDataset
    <root>/dataset.yaml + scene folders its split globs match                     a user's dataset
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from ppt.data.classes import DATASETS, DatasetInfo
from ppt.data.dataset_file import get_dataset_info
from ppt.data.normals import NormalCache
from ppt.data.scene_io import SceneError, load_scene

SPLIT_FOLDERS = ("train", "val", "test")


class SceneDataset(Dataset):
    """Scenes of one dataset split, loaded, validated and transformed on access.

    A sample before transforms: ``coord`` f32 (N, 3), ``color`` f32 (N, 3) 0..255, ``normal``
    f32 (N, 3) (when ``normal.npy`` is missing: estimated by k-NN PCA on the first access and
    cached on disk by ``normal_cache``, see ``ppt.data.normals.NormalCache``), ``segment`` i64 (N,)
    when labels exist, ``instance`` i64 (N,) when present, ``dataset`` str and ``name`` str
    (the scene path below the split folder, "/" replaced by "-": ``scene0000_00``,
    ``Area_5-office_1``, ``scene_03000-room_0``).

    Args:
        root: the dataset's root folder (e.g. ``data/scannet``).
        info: label space and split globs of the dataset.
        split: a key of ``info.splits``.
        transform: callable applied to each sample (see ``ppt.data.transforms``).
        loop: repeat the scene list this many times per epoch.
        skip_bad: validate every scene while listing and skip invalid ones with a warning
            (costs one full read per scene) instead of failing when one is accessed.
        normal_cache: where estimated normals are kept (default: next to the scene, else
            ``$PPT_CACHE/normals``).
    """

    def __init__(self, root: str | os.PathLike, info: DatasetInfo, split: str, transform=None,
                 loop: int = 1, skip_bad: bool = False, normal_cache: NormalCache | None = None):
        self.root, self.info, self.split = Path(root), info, split
        self.transform, self.loop = transform, loop
        self.normal_cache = normal_cache if normal_cache is not None else NormalCache()
        if split not in info.splits:
            raise KeyError(f"{info.name} has no split {split!r}; valid splits: {', '.join(info.splits)}")
        layout = ", ".join(f"{self.root}/{g}/" for g in info.splits[split])
        if not self.root.is_dir():
            raise FileNotFoundError(f"dataset root {self.root} does not exist; expected scene folders "
                                    f"{layout} holding coord.npy, color.npy, {info.segment_file}")
        scenes = sorted({p for g in info.splits[split] for p in self.root.glob(g)
                         if (p / "coord.npy").is_file()})
        if skip_bad:
            scenes = [p for p in scenes if self._is_valid(p)]
        if not scenes:
            raise FileNotFoundError(f"no scenes for split {split!r} under {self.root}; expected folders "
                                    f"{layout} holding coord.npy, color.npy, {info.segment_file}")
        self.scenes: list[Path] = scenes

    def _is_valid(self, folder: Path) -> bool:
        self.normal_cache.discard_stale(folder)  # an outdated estimate is not a broken scene
        try:
            load_scene(folder, self.info.num_classes, self.info.segment_file,
                       ignore_index=self.info.ignore_index)
            return True
        except SceneError as err:
            warnings.warn(f"skipping invalid scene: {err}")
            return False

    def __len__(self) -> int:
        return len(self.scenes) * self.loop

    def scene_name(self, folder: Path) -> str:
        parts = folder.relative_to(self.root).parts
        if len(parts) > 1 and parts[0] in (*SPLIT_FOLDERS, self.split):
            parts = parts[1:]
        return "-".join(parts)

    def load(self, index: int) -> dict:
        """The untransformed sample ``index`` (modulo the scene count)."""
        folder = self.scenes[index % len(self.scenes)]
        self.normal_cache.discard_stale(folder)
        sample = load_scene(folder, self.info.num_classes, self.info.segment_file,
                            ignore_index=self.info.ignore_index)
        if "normal" not in sample:
            sample["normal"] = self.normal_cache.get(folder, sample["coord"])
        sample["dataset"] = self.info.name
        sample["name"] = self.scene_name(folder)
        return sample

    def get(self, index: int, rng: np.random.Generator | None = None):
        """Sample ``index``, transformed; ``rng`` (if given) seeds the transform first."""
        sample = self.load(index)
        if self.transform is None:
            return sample
        if rng is not None:
            self.transform.set_rng(rng)
        return self.transform(sample)

    def __getitem__(self, index: int):
        return self.get(index)


class FolderDataset(SceneDataset):
    """A user's own dataset in the layout ``<root>/<split>/<scene>/*.npy``.

    Args:
        root: dataset root folder.
        class_names: class names in label order (label i = class_names[i]).
        split: sub-folder of ``root`` to read.
        name: dataset name carried by the samples (``dataset`` key).
        segment_file: label file inside each scene folder.
        transform, loop, skip_bad, normal_cache: as for ``SceneDataset``.
    """

    def __init__(self, root: str | os.PathLike, class_names: tuple[str, ...] | list[str],
                 split: str, name: str = "custom", segment_file: str = "segment.npy",
                 transform=None, loop: int = 1, skip_bad: bool = False,
                 normal_cache: NormalCache | None = None):
        info = DatasetInfo(name, tuple(class_names), {split: (f"{split}/*",)}, segment_file)
        super().__init__(root, info, split, transform, loop, skip_bad, normal_cache)


def build_dataset(name: str, data_root: str | os.PathLike, split: str, transform=None,
                  loop: int = 1, skip_bad: bool = False, normal_cache: NormalCache | None = None,
                  described: dict | None = None) -> SceneDataset:
    """Dataset ``name`` read from ``<data_root>/<name>``: a built-in name
    (``ppt.data.classes.DATASETS``), one of ``described`` (a config's ``datasets`` section) or a
    folder with a ``dataset.yaml`` (``ppt.data.dataset_file``).

    Raises ``DatasetFileError`` (a ``ValueError``) saying which folder was looked at for an
    unknown ``name``.
    """
    info = get_dataset_info(name, data_root, described)
    return SceneDataset(Path(data_root) / info.folder_name, info, split, transform, loop, skip_bad, normal_cache)


__all__ = ["SceneDataset", "FolderDataset", "build_dataset", "DATASETS", "NormalCache", "SceneError"]
