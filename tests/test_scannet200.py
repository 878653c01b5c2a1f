"""ScanNet200 as a built-in dataset: raw scans -> ``segment200.npy`` -> ``tools/train.py
--datasets scannet200`` -> ``tools/test.py`` with mIoU per head / common / tail group; and the
reference's ScanNet200 configs (which import ``CLASS_LABELS_200``) through ``tools/convert.py``.

What each test catches:
- ``test_scannet200_trains_and_reports_head_common_tail``: scannet200 missing from the built-in
  datasets or reading the wrong label file (``segment20.npy``: 20 labels where 200 are expected),
  the language head failing on 200 class names, group means not reported by tools/test.py (stdout
  or metrics.json), or computed over the wrong classes (checked against the saved predictions
  counted independently, on a scene holding head, common and tail classes).
- ``test_reference_scannet200_config_converts``: the converter refusing the reference's
  ScanNet200 config (its ``import`` of the class list; ``ScanNet200Dataset`` unknown), mapping it
  to another dataset, or a 200-class head converted wrongly (logits against the reference's).
"""
from __future__ import annotations

import importlib.util
import json
import os
import pprint
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ppt.data.scannet200 import (
    CLASS_LABELS_200, COMMON_CATS_SCANNET_200, HEAD_CATS_SCANNET_200, TAIL_CATS_SCANNET_200, VALID_CLASS_IDS_200,
)
from test_preprocess_scannet import TSV_HEADER, TSV_ROWS, make_scan  # noqa: E402  (tests/ is on sys.path)

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "pointcept"
sys.path.insert(0, str(REPO))
from bench.pointcept_parity_ptv3 import unpack  # noqa: E402  (pack format of the fixtures)

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
GROUPS = {"head": HEAD_CATS_SCANNET_200, "common": COMMON_CATS_SCANNET_200, "tail": TAIL_CATS_SCANNET_200}
# make_scan's "mystery thing" (4 wall vertices) and "crate" (2 floor vertices) relabelled to a
# common and a tail class: the val scene then holds all three groups (wall, floor, office chair
# and ceiling are head classes).
RELABEL = {"mystery thing": "cushion", "crate": "clock"}
# A few steps, tiny batches, no precise BN: the point is the path, not the accuracy.
FAST = ["train.epochs=1", "data.loop=20", "data.batch_size=1", "data.num_workers=0", "data.voxel_size=0.02",
        "train.device=cpu", "train.threads=1", "train.amp=false", "train.precise_bn=0", "train.eval_every=1",
        "train.best_on=scannet200", "train.log_every=10"]


def tool(name: str):
    spec = importlib.util.spec_from_file_location(f"ppt_tool_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *cmd], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """Two raw scans (train, val) preprocessed into ``<root>/scannet``, and ``<root>/scannet200``
    a link to it: one preprocessed folder serves both label spaces, as in the reference."""
    tmp = tmp_path_factory.mktemp("scannet200")
    raw = tmp / "raw"
    for scene, text in (("scene0000_00", False), ("scene0001_00", True)):
        make_scan(raw / "scans", scene, text=text)
        agg = raw / "scans" / scene / f"{scene}.aggregation.json"
        content = json.loads(agg.read_text())
        for group in content["segGroups"]:
            group["label"] = RELABEL.get(group["label"], group["label"])
        agg.write_text(json.dumps(content))
    (raw / "scannetv2_train.txt").write_text("scene0000_00\n")
    (raw / "scannetv2_val.txt").write_text("scene0001_00\n")
    ids = dict(zip(CLASS_LABELS_200, VALID_CLASS_IDS_200))
    rows = [*TSV_ROWS, *((ids[name], name, 40) for name in RELABEL.values())]
    (raw / "scannetv2-labels.combined.tsv").write_text(
        "\n".join([TSV_HEADER, *(f"{i}\t{n}\t{n}\t1\t{nyu}" + "\tx" * 12 for i, n, nyu in rows)]) + "\n")
    root = tmp / "data"
    proc = run(str(REPO / "tools" / "preprocess.py"), "scannet", "--raw", str(raw), "--out", str(root / "scannet"),
               "--workers", "1", "--no-progress")
    assert proc.returncode == 0, proc.stderr[-2000:]
    val = np.load(root / "scannet" / "val" / "scene0001_00" / "segment200.npy")
    present = {CLASS_LABELS_200[i] for i in np.unique(val[val >= 0])}
    assert present == {"wall", "floor", "office chair", "ceiling", "cushion", "clock"}
    return root


def independent_groups(pred: np.ndarray, gt: np.ndarray) -> dict[str, tuple[float | None, float]]:
    """{group: (mean IoU over its classes present, mean over all its classes)} by counting points."""
    pred, gt = pred[gt >= 0].astype(int), gt[gt >= 0].astype(int)
    out = {}
    for group, names in GROUPS.items():
        ious = []
        for name in names:
            c = CLASS_LABELS_200.index(name)
            union = int(((pred == c) | (gt == c)).sum())
            ious.append(int(((pred == c) & (gt == c)).sum()) / union if union else None)
        present = [v for v in ious if v is not None]
        out[group] = (float(np.mean(present)) if present else None, sum(present) / len(names))
    return out


def test_scannet200_trains_and_reports_head_common_tail(data_root, tmp_path, capsys):
    proc = run(str(REPO / "tools" / "train.py"), "--config", "configs/demo.yaml", "--datasets", "scannet200",
               "--data-root", str(data_root), "--name", "s200", "--exp-root", str(tmp_path), *FAST)
    assert proc.returncode == 0, proc.stderr[-3000:]
    exp = tmp_path / "s200"
    log = (exp / "train.log").read_text()
    assert "datasets {'scannet200': 1}" in log
    assert "val scannet200 epoch" in log and " head " in log and " / tail " in log  # groups in training's val line
    head = torch.load(exp / "model" / "model_last.pth", weights_only=False)["model"]["head.text_scannet200"]
    assert head.shape[0] == 200  # the language head embedded the 200 names

    rc = tool("test").main(["--exp", str(exp), "--workers", "0", "--device", "cpu", "--threads", "1",
                            "--save-pred"])
    out = capsys.readouterr().out
    assert rc == 0
    entry = next(iter(json.loads((exp / "result" / "metrics.json").read_text())["results"]["scannet200"].values()))
    groups = entry["groups"]
    assert list(groups) == ["head", "common", "tail"]
    assert [groups[g]["classes"] for g in groups] == [66, 68, 66]
    labelled = {"head": 4, "common": 1, "tail": 1}  # present = labelled (or predicted)
    assert all(groups[g]["classes_present"] >= labelled[g] for g in groups), groups

    pred = np.load(exp / "result" / "scannet200" / "scene0001_00_pred.npy")
    gt = np.load(data_root / "scannet" / "val" / "scene0001_00" / "segment200.npy")
    for group, (miou, miou_ref) in independent_groups(pred, gt).items():
        assert groups[group]["mIoU"] == pytest.approx(miou), group
        assert groups[group]["mIoU_ref"] == pytest.approx(miou_ref), group

    def pct(value):
        return f"{100 * value:.2f}"

    shown = " / ".join(f"{g} {pct(groups[g]['mIoU'])}" for g in groups)
    shown_ref = " / ".join(f"{g} {pct(groups[g]['mIoU_ref'])}" for g in groups)
    assert f"scannet200 {shown} (mIoU, classes present)" in out, out[-3000:]
    assert f"scannet200 {shown_ref} (mIoU_ref, all classes of each group, reference)" in out
    assert re.search(r"^scannet200: mIoU [\d.]+ \(classes present\)", out, re.M)


def test_reference_scannet200_config_converts(data_root, tmp_path, capsys):
    """The reference's ``configs/scannet200/semseg-pt-v3m1-0-base.py`` (fixture copy) with its
    model scaled down to the tiny PT-v3m1 of the conversion fixtures and a 200-class head whose
    first 20 rows are the fixture's: the converted experiment is scannet200's, and its first 20
    logits are the reference's."""
    from ppt.config import load_config
    from ppt.engine.predict import load_experiment

    fixture = torch.load(FIXTURES / "ptv3" / "pt-v3m1.pth", weights_only=False)
    model = {**fixture["case"]["model"], "num_classes": 200}
    state = unpack(fixture["state"])
    g = torch.Generator().manual_seed(0)
    state["seg_head.weight"] = torch.cat([state["seg_head.weight"], torch.randn(180, 8, generator=g) * 0.1])
    state["seg_head.bias"] = torch.cat([state["seg_head.bias"], torch.zeros(180)])
    ckpt = tmp_path / "model_best.pth"
    torch.save({"state_dict": state}, ckpt)

    configs = tmp_path / "configs"
    shutil.copytree(FIXTURES / "configs" / "_base_", configs / "_base_")
    text = (FIXTURES / "configs" / "scannet200" / "semseg-pt-v3m1-0-base.py").read_text()
    start = text.index("model = dict(")
    end = text.index("\n)\n", start) + 3
    assert "from pointcept.datasets.preprocessing.scannet.meta_data.scannet200_constants import" in text[:start]
    config = configs / "scannet200" / "tiny.py"
    config.parent.mkdir()
    config.write_text(text[:start] + f"model = {pprint.pformat(model)}\n" + text[end:])

    assert tool("convert").main([str(ckpt), "--config", str(config), "--name", "conv",
                                 "--exp-root", str(tmp_path)]) == 0, capsys.readouterr().err
    exp = tmp_path / "conv"
    cfg = load_config(exp / "config.yaml", [])
    assert dict(cfg.data.mix) == {"scannet200": 1} and list(cfg.data.val) == ["scannet200"]
    _, ours, _ = load_experiment(exp, None, torch.device("cpu"))
    batch = torch.load(FIXTURES / "ptv3" / "batch.pth", weights_only=False)
    with torch.no_grad():
        logits = ours({**batch, "dataset": "scannet200"})
    assert logits.shape[1] == 200
    expected = fixture["logits"]
    assert float((logits[:, :20] - expected).abs().max() / expected.abs().max()) <= 1e-5

    rc = tool("test").main(["--exp", str(exp), "--data-root", str(data_root), "--workers", "0", "--device", "cpu",
                            "--threads", "1"])
    out = capsys.readouterr().out
    assert rc == 0 and re.search(r"^scannet200 head [\d.]+ / common [\d.n/a]+ / tail [\d.n/a]+ \(mIoU", out, re.M)
