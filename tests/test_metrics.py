"""ConfusionMeter and table formatting on hand-computed cases."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ppt.metrics import ConfusionMeter, format_groups, format_table, group_metrics

# Hand-made case over 4 classes (class 3 never labelled, never predicted):
#   class 0: 3 labelled, all predicted 0, nothing else predicted 0       -> I=3 U=3  IoU 1
#   class 1: 4 labelled, 3 predicted 1, one predicted 2; one class-2
#            point predicted 1                                            -> I=3 U=5  IoU 0.6
#   class 2: 1 labelled (predicted 1), one class-1 point predicted 2      -> I=0 U=2  IoU 0
#   two ignored points predicted 0 must not lower class 0.
TARGET = [0, 0, 0, 1, 1, 1, 1, 2, -1, -1]
PRED = [0, 0, 0, 1, 1, 1, 2, 1, 0, 0]
NAMES = ("wall", "floor", "chair", "sofa")


def test_hand_computed_iou_with_ignore_and_absent_class():
    meter = ConfusionMeter(4, ignore_index=-1)
    meter.update(torch.tensor(PRED), torch.tensor(TARGET))
    s = meter.summary(NAMES)
    assert s["per_class"]["wall"] == pytest.approx(1.0)
    assert s["per_class"]["floor"] == pytest.approx(0.6)
    assert s["per_class"]["chair"] == pytest.approx(0.0)
    assert s["per_class"]["sofa"] is None  # absent: not an IoU of 0
    assert s["mIoU"] == pytest.approx((1 + 0.6 + 0) / 3)
    assert s["mIoU_ref"] == pytest.approx((1 + 0.6 + 0) / 4)  # reference averages over all classes
    assert s["per_class_acc"]["floor"] == pytest.approx(0.75)
    assert s["mAcc"] == pytest.approx((1 + 0.75 + 0) / 3)
    assert s["allAcc"] == pytest.approx(6 / 8)
    assert s["target"] == [3, 4, 1, 0]
    assert s["confusion"].sum() == 8


def test_counts_are_summed_over_updates_not_averaged():
    # Two batches whose per-batch IoUs average differently from the split-level IoU.
    split = ConfusionMeter(4)
    for lo, hi in ((0, 5), (5, 10)):
        split.update(np.array(PRED[lo:hi]), np.array(TARGET[lo:hi]))
    once = ConfusionMeter(4)
    once.update(np.array(PRED), np.array(TARGET))
    assert torch.equal(split.confusion, once.confusion)
    assert split.summary()["mIoU"] == pytest.approx(once.summary()["mIoU"])


def test_matches_a_loop_over_random_points():
    g = torch.Generator().manual_seed(0)
    target = torch.randint(-1, 6, (5000,), generator=g)
    pred = torch.randint(0, 6, (5000,), generator=g)
    meter = ConfusionMeter(6)
    meter.update(pred, target)
    expected = np.zeros((6, 6), np.int64)
    for t, p in zip(target.tolist(), pred.tolist()):
        if t != -1:
            expected[t, p] += 1
    np.testing.assert_array_equal(meter.confusion.numpy(), expected)


def test_out_of_range_labels_and_length_mismatch_are_errors():
    meter = ConfusionMeter(3)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\)"):
        meter.update(torch.tensor([0, 1]), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="predictions"):
        meter.update(torch.tensor([0, 5]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="differ in length"):
        meter.update(torch.tensor([0, 1, 2]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="class names"):
        meter.summary(("a", "b"))


def test_empty_meter_gives_nan_not_crash():
    s = ConfusionMeter(2).summary(("a", "b"))
    assert math.isnan(s["mIoU"]) and math.isnan(s["allAcc"])
    assert math.isnan(s["mIoU_ref"]) and s["classes_present"] == 0
    assert s["per_class"] == {"a": None, "b": None}


def test_table_shows_percentages_and_na():
    meter = ConfusionMeter(4)
    meter.update(torch.tensor(PRED), torch.tensor(TARGET))
    table = format_table(meter.summary(NAMES), title="scannet val")
    lines = table.splitlines()
    assert lines[0] == "scannet val"
    row = {line.split()[0]: line.split() for line in lines if line.split() and line.split()[0] in NAMES}
    assert row["floor"][1:3] == ["60.00", "75.00"]
    assert row["sofa"][1:3] == ["n/a", "n/a"]
    assert "mIoU 53.33" in lines[-2]
    # The reference convention is printed next to ours and named: (100 + 60 + 0 + 0) / 4.
    assert "mIoU over the 3 classes labelled or predicted (1 IoU n/a rows left out)" in lines[-1]
    assert "all 4 classes" in lines[-1] and "mIoU_ref 40.00" in lines[-1]


def test_reference_convention_on_a_hand_made_confusion():
    # Rows = true class, columns = predicted. Class 2 is predicted but never labelled (IoU 0,
    # counted by both conventions); class 3 is neither (absent: ours leaves it out, the
    # reference counts it as 0); class 1 is labelled but never predicted correctly.
    confusion = torch.tensor([[6, 2, 2, 0],
                              [4, 0, 0, 0],
                              [0, 0, 0, 0],
                              [0, 0, 0, 0]])
    meter = ConfusionMeter(4)
    meter.confusion += confusion
    s = meter.summary(NAMES)
    iou = [6 / (10 + 10 - 6), 0 / (4 + 2 - 0), 0 / (0 + 2 - 0)]  # I / (T + P - I) of classes 0..2
    assert s["mIoU"] == pytest.approx(sum(iou) / 3)
    assert s["mIoU_ref"] == pytest.approx(sum(iou) / 4)
    assert s["mIoU_ref"] < s["mIoU"]
    assert s["classes_present"] == 3 and s["num_classes"] == 4
    # Accuracy: ours over the 2 labelled classes, the reference over all 4.
    assert s["mAcc"] == pytest.approx((6 / 10 + 0) / 2)
    assert s["mAcc_ref"] == pytest.approx((6 / 10 + 0) / 4)
    # Where every class occurs, the two conventions agree.
    full = ConfusionMeter(2)
    full.update(torch.tensor([0, 1, 1, 0]), torch.tensor([0, 1, 0, 1]))
    f = full.summary()
    assert f["mIoU"] == pytest.approx(f["mIoU_ref"]) and f["mAcc"] == pytest.approx(f["mAcc_ref"])


def test_group_means_on_a_hand_made_confusion():
    """mIoU per named group (ScanNet200's head / common / tail): each group averages ITS classes
    (bugs caught: groups taken as contiguous label ranges, the overall mIoU copied into every
    group, the absent-class convention of one mean used for the other, a group naming a class
    the label set lacks passing silently)."""
    names = ("a", "b", "c", "d", "e", "f")
    confusion = torch.tensor([[8, 0, 2, 0, 0, 0],   # a: I 8, T 10, P 9  -> IoU 8/11
                              [1, 3, 0, 0, 0, 0],   # b: I 3, T 4, P 4   -> IoU 3/5
                              [0, 0, 6, 0, 0, 0],   # c: I 6, T 6, P 8   -> IoU 6/8
                              [0, 1, 0, 0, 0, 1],   # d: I 0, T 2, P 0   -> IoU 0
                              [0, 0, 0, 0, 0, 0],   # e: never labelled or predicted: absent
                              [0, 0, 0, 0, 0, 0]])  # f: predicted once, never labelled: IoU 0
    meter = ConfusionMeter(6)
    meter.confusion += confusion
    groups = {"head": ("a", "c"), "common": ("b", "e"), "tail": ("f", "d")}  # not label ranges
    s = meter.summary(names, groups=groups)
    assert s["mIoU"] == pytest.approx((8 / 11 + 3 / 5 + 6 / 8 + 0 + 0) / 5)
    assert s["mIoU_ref"] == pytest.approx((8 / 11 + 3 / 5 + 6 / 8 + 0 + 0) / 6)
    g = s["groups"]
    assert list(g) == ["head", "common", "tail"]
    assert g["head"]["mIoU"] == pytest.approx((8 / 11 + 6 / 8) / 2)
    assert g["head"]["mIoU_ref"] == pytest.approx((8 / 11 + 6 / 8) / 2)
    assert g["common"]["mIoU"] == pytest.approx(3 / 5)  # e absent: left out
    assert g["common"]["mIoU_ref"] == pytest.approx(3 / 10)  # e absent: counts 0
    assert g["tail"]["mIoU"] == 0 and g["tail"]["mIoU_ref"] == 0
    assert (g["common"]["classes"], g["common"]["classes_present"]) == (2, 1)
    assert all(v["mIoU"] != pytest.approx(s["mIoU"]) for v in g.values())
    assert group_metrics(s, groups) == g  # the same from a summary after the fact
    assert format_groups(g) == "head 73.86 / common 60.00 / tail 0.00"
    assert format_groups(g, "mIoU_ref") == "head 73.86 / common 30.00 / tail 0.00"
    assert "groups: mIoU head 73.86 / common 60.00 / tail 0.00" in format_table(s).splitlines()[-1]
    assert "groups" not in meter.summary(names)  # no groups asked: none reported
    with pytest.raises(ValueError, match="group 'tail' names 'g', not among the 6 classes"):
        meter.summary(names, groups={"tail": ("f", "g")})
    empty = ConfusionMeter(6).summary(names, groups=groups)["groups"]["head"]
    assert math.isnan(empty["mIoU"]) and math.isnan(empty["mIoU_ref"])


def _reduce_worker(rank: int, world: int, init: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    meter = ConfusionMeter(4)
    half = slice(0, 5) if rank == 0 else slice(5, 10)
    meter.update(torch.tensor(PRED[half]), torch.tensor(TARGET[half]))
    meter.all_reduce()
    torch.save(meter.confusion, f"{out}.{rank}")
    dist.destroy_process_group()


def test_all_reduce_sums_over_processes(tmp_path):
    import torch.multiprocessing as mp

    out = str(tmp_path / "conf")
    mp.spawn(_reduce_worker, args=(2, f"file://{tmp_path / 'rdv'}", out), nprocs=2)
    full = ConfusionMeter(4)
    full.update(torch.tensor(PRED), torch.tensor(TARGET))
    for rank in (0, 1):
        assert torch.equal(torch.load(f"{out}.{rank}"), full.confusion)
