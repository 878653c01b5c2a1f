"""Real ScanNet v2 scenes for local measurements, built from a public snapshot (never committed).

    python bench/real_scans.py --snapshot /work/.mirror/picwoon+votenet/repo/.git --out data/real [--val 3]

The VoteNet repository snapshot holds 23 ScanNet v2 training scenes as
``scannet/scannet_train_detection_data/sceneXXXX_XX_vert.npy`` (float (N, 6): x y z r g b, ~50k
points) and ``..._sem_label.npy`` (NYU40 ids). This writes them in the preprocessed ScanNet layout
under ``<out>/scannet/{train,val}/<scene>/{coord,color,segment20}.npy`` (NYU40 -> the 20
benchmark classes, others -1; normals are estimated on first use by the readers), so every tool
takes ``--data-root <out> --datasets scannet``. The last ``--val`` scenes (by id) are val; a
scene id's rescans (``_00``, ``_01``) always land in the same split. ScanNet's terms apply to the
written files: keep them out of git (``data/`` is ignored).
"""
from __future__ import annotations

import argparse
import io
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ppt.data.classes import SCANNET20_NYU40  # noqa: E402
from ppt.data.scene_io import write_scene  # noqa: E402

FOLDER = "scannet/scannet_train_detection_data"


def nyu40_to_scannet20(ids: np.ndarray) -> np.ndarray:
    """int16 (N,) 20-class labels of NYU40 ids (-1 outside the benchmark's 20)."""
    table = np.full(256, -1, np.int16)
    table[list(SCANNET20_NYU40)] = np.arange(len(SCANNET20_NYU40), dtype=np.int16)
    return table[np.clip(ids.astype(np.int64), 0, 255)]


def read_blob(git_dir: Path, path: str) -> np.ndarray:
    data = subprocess.run(["git", "--git-dir", str(git_dir), "show", f"HEAD:{path}"], check=True,
                          capture_output=True).stdout
    return np.load(io.BytesIO(data), allow_pickle=False)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--snapshot", required=True, help="git dir of the picwoon/votenet snapshot")
    p.add_argument("--out", default="data/real", help="data root to write (<out>/scannet/...)")
    p.add_argument("--val", type=int, default=3, help="scene ids (the last ones) that go to val")
    args = p.parse_args(argv)
    git_dir = Path(args.snapshot)
    listing = subprocess.run(["git", "--git-dir", str(git_dir), "ls-tree", "--name-only", f"HEAD:{FOLDER}"],
                             capture_output=True, text=True)
    if listing.returncode:
        print(f"error: {git_dir}: no {FOLDER} in the snapshot ({listing.stderr.strip()})", file=sys.stderr)
        return 2
    scenes = sorted({n[:12] for n in listing.stdout.split() if n.endswith("_vert.npy")})
    ids = sorted({s[:9] for s in scenes})
    val_ids = set(ids[-args.val:]) if args.val > 0 else set()
    for i, scene in enumerate(scenes):
        vert = read_blob(git_dir, f"{FOLDER}/{scene}_vert.npy")
        label = read_blob(git_dir, f"{FOLDER}/{scene}_sem_label.npy")
        split = "val" if scene[:9] in val_ids else "train"
        write_scene(Path(args.out) / "scannet" / split / scene, {
            "coord": vert[:, :3].astype(np.float32), "color": np.clip(vert[:, 3:6], 0, 255).astype(np.uint8),
            "segment20": nyu40_to_scannet20(label)})
        print(f"[{i + 1}/{len(scenes)}] {split}/{scene}: {len(vert):,} points", flush=True)
    print(f"wrote {len(scenes)} scenes ({sum(s[:9] in val_ids for s in scenes)} val) to {args.out}/scannet")
    return 0


if __name__ == "__main__":
    sys.exit(main())
