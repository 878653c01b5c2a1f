"""Self-describing dataset folders: ``<data root>/<name>/dataset.yaml`` makes ``<name>`` a dataset.

A user's own labelled scans become a dataset like the built-in three without a code edit: the
folder holds scenes in the preprocessed layout (``<scene>/coord.npy, color.npy, [normal.npy],
segment.npy``) and a ``dataset.yaml`` that says what the labels mean::

    classes: [floor, wall, desk, chair, shelf]   # label i = classes[i], label order
    splits:                                      # split -> folder globs below this folder
      train: [train/*]
      val: [val/*]
    label_file: segment.npy                      # per-point integer labels in each scene folder
    ignore: -1                                   # the value that means "no label"
    color: true                                  # false: the clouds had no colour (written as 0)
    source: "tools/preprocess.py labelled --src scans/"   # a note of where it came from
    groups: {}                                   # optional class groups for reports (name -> classes)

``tools/preprocess.py labelled`` writes such a folder from PLY / LAS / txt / npy files. Every
name goes through :func:`resolve_dataset`: a built-in name (``ppt.data.classes.DATASETS``) wins,
then a description already known (the ``datasets`` section of a run's config, so a trained model
needs no data folder to run), then the folder's ``dataset.yaml``. The file is parsed by the same
typed-config machinery as experiment configs: an unknown key names the nearest valid one.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ppt.data.classes import DATASETS, IGNORE_INDEX, DatasetInfo
from ppt.io import atomic_write
from ppt.typed_config import ConfigError, from_dict, plain

DATASET_FILE = "dataset.yaml"
NAME_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789_-")


class DatasetFileError(ConfigError):
    """A dataset name that resolves to nothing, or a ``dataset.yaml`` that is not valid."""


@dataclass
class DatasetSpec:
    """The typed content of a ``dataset.yaml`` (also the ``datasets`` section of a config).

    Args:
        classes: class names in label order (label ``i`` = ``classes[i]``); unique, non-empty.
        splits: split name -> folder globs relative to the dataset folder, each matching scene
            folders; ``train`` is required for training, ``val`` for validation.
        label_file: the ``.npy`` label file inside each scene folder.
        ignore: the label value that means "no label" (mapped to -1 when read).
        color: whether the clouds carry colour (false: ``color.npy`` holds zeros; a model
            trained on them should use ``data.color_drop`` or expect colourless input).
        source: free-text note of where the data came from.
        groups: optional named groups of classes for reports (e.g. ScanNet200's head / common /
            tail); every listed class must be in ``classes``.
    """

    classes: list[str] = field(default_factory=list)
    splits: dict[str, list[str]] = field(default_factory=lambda: {"train": ["train/*"], "val": ["val/*"]})
    label_file: str = "segment.npy"
    ignore: int = IGNORE_INDEX
    color: bool = True
    source: str = ""
    groups: dict[str, list[str]] = field(default_factory=dict)

    def check(self, where: str) -> "DatasetSpec":
        """Raise DatasetFileError naming ``where`` and the key unless the description is usable."""
        def bad(key: str, msg: str) -> DatasetFileError:
            return DatasetFileError(f"{where}: '{key}' {msg}")

        if not self.classes:
            raise bad("classes", "is missing or empty; list the class names in label order "
                                 "(label 0 first), e.g. classes: [floor, wall, chair]")
        names = [c.strip() for c in self.classes]
        if any(not n for n in names):
            raise bad("classes", "holds an empty name")
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise bad("classes", f"names {', '.join(dup)} more than once; each label needs its own name")
        self.classes = names
        if not self.splits or any(not globs for globs in self.splits.values()):
            raise bad("splits", "must map each split to folder globs, e.g. {train: [train/*], val: [val/*]}")
        for split, globs in self.splits.items():
            for g in globs:
                if Path(g).is_absolute() or ".." in Path(g).parts:
                    raise bad(f"splits.{split}", f"glob {g!r} must stay inside the dataset folder")
        if not self.label_file.endswith(".npy") or "/" in self.label_file:
            raise bad("label_file", f"is {self.label_file!r}; expected a file name like segment.npy")
        if 0 <= self.ignore < len(self.classes):
            raise bad("ignore", f"is {self.ignore}, which is the label of class {self.classes[self.ignore]!r}; "
                                f"use -1 or a value outside 0..{len(self.classes) - 1}")
        for group, members in self.groups.items():
            unknown = [m for m in members if m not in names]
            if unknown:
                raise bad(f"groups.{group}", f"names {', '.join(unknown[:5])}, not in classes")
        return self

    def info(self, name: str) -> DatasetInfo:
        """The runtime description of dataset ``name``."""
        return DatasetInfo(name, tuple(self.classes), {k: tuple(v) for k, v in self.splits.items()},
                           self.label_file, ignore_index=self.ignore, has_color=self.color,
                           source=self.source, groups={k: tuple(v) for k, v in self.groups.items()})


def spec_of(info: DatasetInfo) -> DatasetSpec:
    """The ``dataset.yaml`` content describing ``info`` (e.g. to write one for a built-in)."""
    return DatasetSpec(list(info.class_names), {k: list(v) for k, v in info.splits.items()},
                       info.segment_file, info.ignore_index, info.has_color, info.source,
                       {k: list(v) for k, v in info.groups.items()})


def check_name(name: str) -> str:
    """A dataset name is a folder name and a config key: lower-case letters, digits, ``_``, ``-``."""
    if not name or not set(name) <= NAME_CHARS or name[0] in "-_":
        raise DatasetFileError(f"dataset name {name!r} must be lower-case letters, digits, '_' or '-' "
                               f"(it names the folder <data root>/{name}/ and config keys)")
    return name


def read_dataset_file(folder: str | os.PathLike) -> DatasetSpec:
    """Parse and check ``<folder>/dataset.yaml``.

    Raises:
        FileNotFoundError: no such file.
        DatasetFileError: unreadable YAML, unknown key (with the nearest valid one), wrong type
            or an unusable value; the message names the file and the key.
    """
    path = Path(folder) / DATASET_FILE
    if not path.is_file():
        raise FileNotFoundError(str(path))
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise DatasetFileError(f"{path}: not a readable YAML file ({err})") from None
    try:
        spec = from_dict(DatasetSpec, data if data is not None else {}, "", f" in {path}")
    except ConfigError as err:
        raise DatasetFileError(str(err).replace("config key", "key")) from None
    return spec.check(str(path))


def write_dataset_file(folder: str | os.PathLike, spec: DatasetSpec) -> Path:
    """Write ``<folder>/dataset.yaml`` atomically (temp file + rename); returns its path."""
    spec.check(str(Path(folder) / DATASET_FILE))
    text = ("# Written by PPT; describes this dataset folder (see ppt/data/dataset_file.py).\n"
            + yaml.safe_dump(plain(spec.__dict__), sort_keys=False, default_flow_style=None, allow_unicode=True))
    return atomic_write(Path(folder) / DATASET_FILE, lambda f: f.write(text.encode()))


def unknown_dataset_message(name: str, root: str | os.PathLike | None) -> str:
    """What to say about a name that is neither built in nor described."""
    builtin = ", ".join(DATASETS)
    if root is None:
        return f"unknown dataset {name!r}; built-in: {builtin} (a folder with a {DATASET_FILE} adds more)"
    folder = Path(root) / name
    seen = "exists but holds no" if folder.is_dir() else "does not exist, so there is no"
    return (f"unknown dataset {name!r}: not built in ({builtin}) and {folder}/ {seen} {DATASET_FILE}; "
            f"that file must hold 'classes' (names in label order) and 'splits' (split -> folder globs, "
            f"e.g. {{train: [train/*], val: [val/*]}}); tools/preprocess.py labelled --src DIR --name {name} "
            f"--classes ... --out {root} writes one from labelled PLY / LAS / txt / npy files")


def resolve_dataset(name: str, root: str | os.PathLike | None = None,
                    described: dict[str, DatasetSpec] | None = None) -> DatasetInfo:
    """The description of dataset ``name``: built in, else ``described[name]`` (a config's
    ``datasets`` section), else ``<root>/<name>/dataset.yaml``.

    Raises:
        DatasetFileError: nothing describes ``name`` (the message says which folder was looked
            at and what the file must hold), or its file is not valid.
    """
    if name in DATASETS:
        return DATASETS[name]
    if described and name in described:
        return described[name].info(name)
    if root is not None:
        try:
            return read_dataset_file(Path(root) / check_name(name)).info(name)
        except FileNotFoundError:
            pass
    raise DatasetFileError(unknown_dataset_message(name, root))


def get_dataset_info(name: str, root: str | os.PathLike | None = None,
                     described: dict[str, DatasetSpec] | None = None) -> DatasetInfo:
    """Look a dataset up by name (:func:`resolve_dataset`): built in, else ``described`` (a
    config's ``datasets`` section), else ``<root>/<name>/dataset.yaml``."""
    return resolve_dataset(name, root, described)


def described_datasets(root: str | os.PathLike) -> list[str]:
    """Names of the folders under ``root`` that are datasets: built-in names and folders
    holding a ``dataset.yaml``, in that order."""
    root = Path(root)
    if not root.is_dir():
        return []
    own = sorted(p.name for p in root.iterdir()
                 if p.is_dir() and p.name not in DATASETS and (p / DATASET_FILE).is_file())
    return [d for d in DATASETS if (root / d).is_dir()] + own
