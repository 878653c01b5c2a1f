"""Inputs of a labelled import: the class list, the ignore values, the files under ``--src``
and their train / val split (see ``ppt.data.preprocess.labelled``)."""
from __future__ import annotations

import fnmatch
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ppt.data.dataset_file import DatasetFileError, DatasetSpec
from ppt.data.preprocess.labelled_formats import CLOUD_SUFFIXES, LabelledError


@dataclass(frozen=True)
class Source:
    """One input: a file or a scene folder, the scene name it gets, its path below ``--src``."""

    path: Path
    name: str
    rel: str


def parse_classes(value: str) -> tuple[str, ...]:
    """``--classes``: a file (one name per line; blank lines and ``#`` comments skipped) or a
    comma list. Raises LabelledError."""
    path = Path(value)
    if path.is_file():
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise LabelledError(f"--classes {value}: cannot read ({err})") from None
        names = [ln.split("#", 1)[0].strip() for ln in lines]
    elif "," in value or not (path.suffix or os.sep in value):
        names = value.split(",")
    else:
        raise LabelledError(f"--classes {value}: no such file (give a file with one name per line, "
                            f"or a comma list such as 'floor,wall,chair')")
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise LabelledError(f"--classes {value}: no class names")
    try:
        DatasetSpec(list(names)).check(f"--classes {value}")
    except DatasetFileError as err:
        raise LabelledError(str(err)) from None
    return tuple(names)


def parse_ignore(value: str | None) -> tuple[int, ...]:
    """``--ignore``: one integer label value or a comma list."""
    if not value:
        return ()
    try:
        return tuple(int(float(v)) for v in value.split(",") if v.strip())
    except ValueError:
        raise LabelledError(f"--ignore {value}: expected integer label values, e.g. --ignore 0 or --ignore 0,1") from None


def find_sources(src: Path, exclude: set[Path]) -> tuple[list[Source], list[str]]:
    """Every labelled file and scene folder below ``src`` (recursively; hidden entries and
    ``exclude`` left out), and one note per entry skipped. Raises LabelledError on no input or
    two inputs that would get the same scene name."""
    if not src.is_dir():
        raise LabelledError(f"--src {src}: no such folder")
    found: list[Source] = []
    skipped: list[str] = []

    def walk(folder: Path) -> None:
        for entry in sorted(folder.iterdir()):
            if entry.name.startswith(".") or entry.resolve() in exclude:
                continue
            rel = entry.relative_to(src)
            if entry.is_dir():
                if (entry / "coord.npy").is_file():
                    found.append(Source(entry, scene_name(rel.parts), str(rel)))
                else:
                    walk(entry)
            elif entry.suffix.lower() in CLOUD_SUFFIXES:
                found.append(Source(entry, scene_name(rel.with_suffix("").parts), str(rel)))
            else:
                skipped.append(f"skipped {rel}: not a labelled cloud ({', '.join(CLOUD_SUFFIXES)})")

    if (src / "coord.npy").is_file():
        found.append(Source(src, scene_name((src.resolve().name,)), src.name))
    else:
        walk(src)
    if not found:
        raise LabelledError(f"--src {src}: no labelled clouds found ({', '.join(CLOUD_SUFFIXES)}, "
                            f"or scene folders holding coord.npy)")
    by_name: dict[str, Source] = {}
    for s in found:
        if s.name in by_name:
            raise LabelledError(f"--src {src}: {by_name[s.name].rel} and {s.rel} would both be scene "
                                f"{s.name!r}; rename one of them")
        by_name[s.name] = s
    return found, skipped


def scene_name(parts: tuple[str, ...]) -> str:
    """A folder-safe scene name from a path below ``--src`` (``area1/room 2`` -> ``area1_room_2``)."""
    return re.sub(r"[^\w.-]+", "_", "_".join(parts)).strip("._") or "scene"


def assign_splits(sources: list[Source], val_globs: list[str] | None, fraction: float,
                  seed: int = 0) -> dict[str, str]:
    """Scene name -> ``train`` / ``val``.

    ``val_globs``: a scene is val when a glob matches its file name, relative path or scene
    name. Else ``fraction`` of the scenes (rounded, at least one when there are two or more)
    go to val: those with the smallest hash of ``seed`` and their name, so the choice does not
    depend on the order of the files.
    """
    names = [s.name for s in sources]
    if val_globs:
        val = {s.name for s in sources for g in val_globs
               if any(fnmatch.fnmatch(x, g) for x in (s.path.name, s.rel, s.name))}
        if not val:
            raise LabelledError(f"--val {' '.join(val_globs)}: matches none of the {len(names)} scenes "
                                f"(e.g. {', '.join(s.path.name for s in sources[:3])})")
        if len(val) == len(names):
            raise LabelledError(f"--val {' '.join(val_globs)}: matches all {len(names)} scenes; "
                                f"none is left to train on")
    else:
        if not 0.0 <= fraction < 1.0:
            raise LabelledError(f"--val-fraction {fraction}: must be in [0, 1)")
        count = int(round(fraction * len(names)))
        if fraction > 0 and len(names) >= 2:
            count = min(max(count, 1), len(names) - 1)
        ranked = sorted(names, key=lambda n: hashlib.sha256(f"{seed}:{n}".encode()).hexdigest())
        val = set(ranked[:count])
    return {n: "val" if n in val else "train" for n in names}
