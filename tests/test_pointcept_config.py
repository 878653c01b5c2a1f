"""Safe evaluation of Pointcept config files (ppt/interop/pointcept_config.py).

Real configs come from tests/fixtures/pointcept/configs (copies of the reference's files, see
the README there); malicious ones are written per test.
"""
from pathlib import Path

import pytest

from ppt.interop.pointcept_config import PointceptConfigError, base_files, load_pointcept_config, merge_into

CONFIGS = Path(__file__).parent / "fixtures" / "pointcept" / "configs"


def write(tmp_path: Path, text: str, name: str = "cfg.py") -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_spunet_config_values_and_base():
    """Values of a real config and of its _base_ (bug: base not merged, or a name bound
    earlier not resolved, e.g. ``max_lr=optimizer["lr"]``)."""
    cfg = load_pointcept_config(CONFIGS / "scannet" / "semseg-spunet-v1m1-0-base.py")
    assert cfg["model"]["backbone"]["type"] == "SpUNet-v1m1"
    assert cfg["model"]["backbone"]["channels"] == (32, 64, 128, 256, 256, 128, 96, 96)
    assert cfg["scheduler"]["max_lr"] == 0.05  # optimizer["lr"], a subscript of an earlier name
    assert cfg["data"]["train"]["type"] == "ScanNetDataset"  # dataset_type, an earlier name
    assert cfg["data"]["train"]["transform"][3]["angle"] == [-1 / 64, 1 / 64]
    assert cfg["hooks"][0] == {"type": "CheckpointLoader"}  # from _base_/default_runtime.py
    assert cfg["batch_size"] == 12  # the child overrides the base's 16
    assert "_base_" not in cfg


def test_ppt_config_tables():
    """PPT's conditions and valid_index tables come out as tuples in file order."""
    cfg = load_pointcept_config(CONFIGS / "scannet" / "semseg-ppt-v1m1-0-sc-st-spunet.py")
    model = cfg["model"]
    assert model["conditions"] == ("Structured3D", "ScanNet", "S3DIS")
    assert model["backbone"]["conditions"] == ("ScanNet", "S3DIS", "Structured3D")
    assert model["valid_index"][2] == (0, 1, 4, 5, 6, 7, 8, 10, 19, 29, 30, 31, 32)
    assert len(model["class_name"]) == 36


def test_scannet200_config_imports_the_class_list():
    """The reference's ScanNet200 configs ``from pointcept...scannet200_constants import
    CLASS_LABELS_200``: the import resolves to this project's copy of the 200 names (bug: the
    import refused, so every ScanNet200 config of the reference fails to convert)."""
    from ppt.data.scannet200 import CLASS_LABELS_200

    cfg = load_pointcept_config(CONFIGS / "scannet200" / "semseg-pt-v3m1-0-base.py")
    assert cfg["data"]["names"] == CLASS_LABELS_200 and len(CLASS_LABELS_200) == 200
    assert cfg["data"]["names"][9] == "office chair" and cfg["data"]["num_classes"] == 200
    assert cfg["data"]["val"]["type"] == "ScanNet200Dataset"
    assert cfg["model"]["backbone"]["type"] == "PT-v3m1" and cfg["hooks"][0] == {"type": "CheckpointLoader"}
    assert "CLASS_LABELS_200" in cfg  # a module-level name, as in Pointcept's Config


def test_import_from_known_table_with_alias(tmp_path):
    path = write(tmp_path, "from pointcept.datasets.preprocessing.scannet.meta_data.scannet200_splits import (\n"
                           "    HEAD_CATS_SCANNET_200 as head, TAIL_CATS_SCANNET_200)\nn = len(head)\n")
    cfg = load_pointcept_config(path)
    assert cfg["n"] == 66 and cfg["head"][0] == "tv stand" and len(cfg["TAIL_CATS_SCANNET_200"]) == 66


def test_comprehension_fstring_del():
    """The Sonata pretraining config: list comprehension over two loops, f-string keys,
    ``sum`` of slices, and ``del`` of a helper name (bug: comprehension scope or del ignored)."""
    cfg = load_pointcept_config(CONFIGS / "sonata" / "pretrain-sonata-v1m1-0-base.py")
    depths = cfg["model"]["backbone"]["enc_depths"]
    groups = cfg["param_dicts"]
    assert len(groups) == sum(depths)
    assert groups[0]["keyword"] == "enc0.block0."
    last = groups[-1]
    assert last["keyword"] == f"enc{len(depths) - 1}.block{depths[-1] - 1}."
    assert last["lr"] == pytest.approx(cfg["base_lr"])  # exponent 0 for the last block
    assert "dec_depths" not in cfg


@pytest.mark.parametrize("text, construct", [
    ("x = __import__('os').system('echo pwned')", "call of __import__"),
    ("import os\nx = 1", "import"),
    ("from os import system", "import"),
    ("x = dict(a=1).__class__", "attribute access .__class__"),
    ("x = ().__class__.__base__.__subclasses__()", "call of ().__class__"),
    ("x = open('/etc/passwd')", "call of open"),
    ("x = eval('1')", "call of eval"),
    ("f = lambda: 1", "Lambda"),
    ("for i in range(3):\n    x = i", "For"),
    ("x = '{0.__class__}'.format(1)", "reaches into an object"),
    ("x = 2 ** 10 ** 10", "exponent"),
    ("x = [0] * 10 ** 9", "repetition"),
    ("dict = 5\nx = dict(a=1)", "call of dict"),  # a rebound safe name is not the builtin
    # only the reference's known constant tables, only their known names
    ("from pointcept.models import build_model", "import from pointcept.models is not allowed"),
    ("from .scannet200_constants import CLASS_LABELS_200", "import from .scannet200_constants is not allowed"),
    ("from pointcept.datasets.preprocessing.scannet.meta_data.scannet200_constants import *", "* is not known"),
    ("from pointcept.datasets.preprocessing.scannet.meta_data.scannet200_constants import (\n"
     "    CLASS_LABELS_200, SCANNET_COLOR_MAP_200)", "SCANNET_COLOR_MAP_200 is not known"),
])
def test_refused(tmp_path, text, construct):
    """Code that could run anything (or exhaust the machine) is refused with file and line."""
    path = write(tmp_path, "a = 1\n" + text + "\n")
    with pytest.raises(PointceptConfigError) as err:
        load_pointcept_config(path)
    message = str(err.value)
    assert construct in message
    assert f"{path}:2" in message or f"{path}:3" in message


def test_undefined_name(tmp_path):
    path = write(tmp_path, "model = dict(type=backbone_type)\n")
    with pytest.raises(PointceptConfigError, match=r"cfg.py:1: name 'backbone_type' is not defined"):
        load_pointcept_config(path)


def test_missing_base_named(tmp_path):
    """A missing _base_ file is named with the config that needs it."""
    path = write(tmp_path, '_base_ = ["../_base_/default_runtime.py"]\nx = 1\n', "scannet/cfg.py")
    with pytest.raises(PointceptConfigError, match=r"default_runtime.py does not exist \(a _base_ of .*cfg.py\)"):
        load_pointcept_config(path)
    assert [p.name for p in base_files(path)] == ["default_runtime.py"]


def test_delete_key_and_merge(tmp_path):
    """Dicts merge into the base recursively; ``_delete_=True`` replaces the base's dict (bug:
    _delete_ kept as a key, or merged instead of replaced)."""
    write(tmp_path, "opt = dict(type='SGD', lr=0.1, momentum=0.9)\nsched = dict(a=1, b=2)\nn = 3\n", "base.py")
    path = write(tmp_path, "_base_ = 'base.py'\nopt = dict(lr=0.5)\nsched = dict(_delete_=True, c=3)\n")
    cfg = load_pointcept_config(path)
    assert cfg == {"opt": {"type": "SGD", "lr": 0.5, "momentum": 0.9}, "sched": {"c": 3}, "n": 3}
    with pytest.raises(PointceptConfigError, match="cannot merge"):
        merge_into({"n": {"a": 1}}, {"n": 3})


def test_duplicate_key_in_bases(tmp_path):
    write(tmp_path, "a = 1\n", "b1.py")
    write(tmp_path, "a = 2\n", "b2.py")
    path = write(tmp_path, "_base_ = ['b1.py', 'b2.py']\n")
    with pytest.raises(PointceptConfigError, match="appear in more than one _base_"):
        load_pointcept_config(path)


def test_syntax_error_and_circular(tmp_path):
    with pytest.raises(PointceptConfigError, match=r"cfg.py:1: syntax error"):
        load_pointcept_config(write(tmp_path, "x = (\n"))
    path = write(tmp_path, "_base_ = 'loop.py'\n", "loop.py")
    with pytest.raises(PointceptConfigError, match="circular"):
        load_pointcept_config(path)
