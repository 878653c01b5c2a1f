"""A user's own dataset (``<data root>/<name>/dataset.yaml``) wherever a dataset name goes:
the train mix, validation, tools/test.py, a PEFT target, --plan, check_data, resume, weights.

The user dataset ``mydata`` holds the synthetic S3DIS rooms under class names of its own
(``girder``, ``whiteboard``, ...): were its folder ignored anywhere, that step would either
refuse the name or show another label space's names.
"""
from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from ppt.config import ConfigError, load_config
from ppt.data.dataset_file import DatasetFileError, DatasetSpec, read_dataset_file, write_dataset_file
from ppt.data.datasets import build_dataset

REPO = Path(__file__).resolve().parents[1]
OWN = ["roof", "floor", "partition", "girder", "pillar", "glazing", "entrance", "worktop", "chair",
       "couch", "shelving", "whiteboard", "misc"]  # 13 names for S3DIS's 13 labels; floor, chair shared
TINY = ["model.channels=[8,8,16,16,16,16,8,8]", "model.layers=[1,1,1,1,1,1,1,1]", "model.prompt_dim=16",
        "model.head=decoupled", "data.voxel_size=0.1", "data.num_workers=0", "data.batch_size=1",
        "train.device=cpu", "train.threads=1", "train.log_every=1", "train.epochs=1",
        "train.steps_per_epoch=2", "train.eval_every=1", "train.precise_bn=0", "data.mix3d_prob=0"]


def tool(name: str):
    spec = importlib.util.spec_from_file_location(f"ppt_own_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_own(root: Path, s3dis: Path, name: str = "mydata", classes=OWN, **spec) -> Path:
    """``root/name``: S3DIS rooms as train / val scenes under ``classes`` (written by hand,
    as a user or tools/preprocess.py labelled would)."""
    rooms = sorted(p for p in s3dis.glob("Area_*/*") if p.is_dir())
    for i, room in enumerate(rooms):
        shutil.copytree(room, root / name / ("val" if i == 0 else "train") / f"room{i}")
    write_dataset_file(root / name, DatasetSpec(list(classes), **spec))
    return root / name


@pytest.fixture(scope="module")
def data(synthetic_root, tmp_path_factory):
    root = tmp_path_factory.mktemp("own") / "data"
    shutil.copytree(synthetic_root / "scannet", root / "scannet")
    make_own(root, synthetic_root / "s3dis")
    return root


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory, synthetic_root):
    """A run on mydata + scannet (mydata first) and a base on scannet alone."""
    exp = tmp_path_factory.mktemp("exp")
    train = tool("train")
    demo = ["--config", str(REPO / "configs" / "demo.yaml")]
    assert train.main([*demo, "--datasets", "mydata:1,scannet:1", "--data-root", str(data), "--name", "joint",
                       "--exp-root", str(exp), *TINY]) == 0
    assert train.main([*demo, "--datasets", "scannet", "--data-root", str(data), "--name", "base",
                       "--exp-root", str(exp), *TINY]) == 0
    return exp


def test_train_mix_and_validation_read_the_folder(trained, capsys):
    import yaml

    saved = yaml.safe_load((trained / "joint" / "config.yaml").read_text())
    assert saved["datasets"]["mydata"]["classes"] == OWN  # the run keeps its label space
    log = (trained / "joint" / "train.log").read_text()
    assert "val mydata epoch 1" in log and "girder=" in log  # validated under its own names
    from ppt.engine.predict import load_experiment

    cfg, model, _ = load_experiment(trained / "joint")
    assert model.head.class_names["mydata"] == tuple(OWN)
    assert model.domains[:2] == ("mydata", "scannet")


def test_test_tool_tables_name_the_users_classes(trained, capsys):
    assert tool("test").main(["--exp", str(trained / "joint"), "--dataset", "mydata"]) == 0
    out = capsys.readouterr().out
    for name in ("girder", "whiteboard", "partition"):
        assert f"\n{name} " in out
    assert "mydata: mIoU" in out


def test_the_model_needs_no_data_folder_to_run(trained, tmp_path):
    """A trained model keeps its datasets' descriptions: it labels a cloud with the data gone."""
    exp = tmp_path / "joint"
    shutil.copytree(trained / "joint", exp)
    import yaml

    cfg = yaml.safe_load((exp / "config.yaml").read_text())
    cfg["data"]["root"] = str(tmp_path / "gone")
    (exp / "config.yaml").write_text(yaml.safe_dump(cfg))
    from ppt.engine.predict import Predictor

    pred = Predictor(exp, prompt="mydata").predict(np.random.default_rng(0).uniform(0, 3, (500, 6)))
    assert pred.class_names == tuple(OWN)


def test_plan_counts_the_users_scenes(data, capsys):
    assert tool("train").main(["--config", str(REPO / "configs" / "demo.yaml"), "--datasets", "mydata",
                               "--data-root", str(data), "--plan"]) == 0
    out = capsys.readouterr().out
    scenes = len(list((data / "mydata" / "train").iterdir()))
    assert any(line.split()[:3] == ["mydata", "1", str(2 * scenes)] for line in out.splitlines()), out  # loop 2


def test_peft_target_is_a_users_dataset(trained, data, capsys):
    exp = trained / "peft"
    assert tool("train").main(["--peft", "linear", "--config", str(REPO / "configs" / "demo_peft.yaml"),
                               "--weights", str(trained / "base" / "model" / "model_last.pth"),
                               "--datasets", "mydata", "--data-root", str(data), "--name", "lin",
                               "--exp-root", str(exp), *TINY[-7:]]) == 0
    log = (exp / "lin" / "train.log").read_text()
    assert "mydata<-mean of scannet" in log  # a new domain starts from the base's mean prompt
    assert "val mydata epoch 1" in log and "whiteboard=" in log


def test_resume_refuses_a_changed_description(trained, data, tmp_path, capsys):
    exp = tmp_path / "exp"
    shutil.copytree(trained / "base", exp / "base")
    moved = tmp_path / "data"
    shutil.copytree(data, moved)
    import yaml

    cfg = yaml.safe_load((exp / "base" / "config.yaml").read_text())
    cfg["data"]["mix"] = {"mydata": 1}
    cfg["datasets"] = {"mydata": {"classes": OWN}}
    (exp / "base" / "config.yaml").write_text(yaml.safe_dump(cfg))
    write_dataset_file(moved / "mydata", DatasetSpec(OWN[:-1] + ["other"]))
    assert tool("train").main(["--name", "base", "--resume", "--exp-root", str(exp),
                               "--data-root", str(moved)]) == 2
    err = capsys.readouterr().err
    assert "datasets.mydata" in err and "differs from" in err and "'other'" in err


def test_unknown_name_says_where_it_looked(data, tmp_path, capsys):
    assert tool("train").main(["--config", str(REPO / "configs" / "demo.yaml"), "--datasets", "mydat",
                               "--data-root", str(data), "--exp-root", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:")
    assert f"{data}/mydat/ does not exist" in err[0] and "'classes'" in err[0] and "'splits'" in err[0]
    assert not (tmp_path / "demo").exists()


def test_check_data_lists_the_users_dataset(data, capsys):
    assert tool("check_data").main([str(data)]) == 0
    out = capsys.readouterr().out
    assert "mydata/train: 4 scenes" in out and "mydata/val: 1 scenes" in out


@pytest.mark.parametrize("text, match", [
    ("clases: [a, b]\n", "unknown .*'clases'.*did you mean 'classes'"),
    ("classes: [a, a]\n", "names a more than once"),
    ("classes: []\n", "'classes' is missing or empty"),
    ("classes: [a, b]\nignore: 1\n", "'ignore' is 1, which is the label of class 'b'"),
    ("classes: [a, b]\nsplits: {train: [../x/*]}\n", "must stay inside"),
    ("classes: a, b\n", "must be list"),
])
def test_bad_dataset_file_is_one_clear_error(tmp_path, text, match):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "dataset.yaml").write_text(text)
    with pytest.raises(DatasetFileError, match=match):
        read_dataset_file(tmp_path / "d")
    with pytest.raises(ConfigError, match=f"data.mix.*{tmp_path}/d/dataset.yaml"):
        load_config(None, [f"data.root={tmp_path}", "data.mix={d: 1}"])


def test_ignore_value_of_the_file_is_read_as_minus_one(synthetic_root, tmp_path):
    folder = make_own(tmp_path, synthetic_root / "s3dis", "own255", ignore=255)
    scene = next((folder / "train").iterdir())
    seg = np.load(scene / "segment.npy").astype(np.int16)
    seg[:7] = 255
    np.save(scene / "segment.npy", seg)
    ds = build_dataset("own255", tmp_path, "train")
    sample = ds.load(ds.scenes.index(scene))
    assert (sample["segment"][:7] == -1).all() and sample["segment"].max() < len(OWN)
    from ppt.data.check import check_data_root

    assert check_data_root(tmp_path, ["own255"], ["train"], quick=False, raise_on_error=False).ok
    write_dataset_file(folder, DatasetSpec(OWN))  # without it, 255 is a label outside the list
    with pytest.raises(Exception, match="labels outside 0..12"):
        build_dataset("own255", tmp_path, "train").load(ds.scenes.index(scene))


def test_new_dataset_starts_from_the_mean_and_shared_class_rows(trained, data, tmp_path):
    """Fine-tuning the mydata + scannet model onto another user dataset: its prompt is the mean of
    the two trained prompts, and its classifier rows come by class NAME from the base, read from
    the base config's own description of mydata (mydata comes first, so its "chair" row wins
    over scannet's)."""
    from ppt.engine.build import build_model
    from ppt.engine.weights import read_base, load_weights

    write_dataset_file(tmp_path / "second", DatasetSpec(["chair", "lamp shade", "floor"]))
    cfg = load_config(None, [f"data.root={tmp_path}", "data.mix={second: 1}", *TINY])
    torch.manual_seed(0)
    model = build_model(cfg)
    fresh = model.state_dict()["head.classifiers.second.weight"].clone()
    report = load_weights(model, trained / "joint" / "model" / "model_last.pth")
    base, _ = read_base(trained / "joint" / "model" / "model_last.pth")
    state = model.state_dict()
    table = base["prompts.table.weight"]
    torch.testing.assert_close(state["prompts.table.weight"][0], table[:2].mean(0))
    rows = state["head.classifiers.second.weight"]
    torch.testing.assert_close(rows[0], base["head.classifiers.mydata.weight"][OWN.index("chair")])
    torch.testing.assert_close(rows[2], base["head.classifiers.mydata.weight"][OWN.index("floor")])
    torch.testing.assert_close(rows[1], fresh[1])  # "lamp shade": no base class of that name
    assert "second<-mean of mydata+scannet" in report


def test_a_colourless_dataset_gives_a_model_that_labels_colourless_clouds(synthetic_root, tmp_path):
    """dataset.yaml ``color: false`` (the importer's record of clouds without colour) reaches the
    model: it labels a cloud without colour (colour 0, as its training data) instead of refusing."""
    folder = make_own(tmp_path / "data", synthetic_root / "s3dis", "grey", color=False)
    for scene in folder.glob("*/*"):
        np.save(scene / "color.npy", np.zeros_like(np.load(scene / "color.npy")))
    assert tool("train").main(["--config", str(REPO / "configs" / "demo.yaml"), "--datasets", "grey",
                               "--data-root", str(tmp_path / "data"), "--name", "grey",
                               "--exp-root", str(tmp_path / "exp"), *TINY]) == 0
    from ppt.engine.predict import Predictor

    pred = Predictor(tmp_path / "exp" / "grey").predict(np.random.default_rng(0).uniform(0, 3, (400, 3)))
    assert pred.class_names == tuple(OWN) and (pred.labels >= 0).all()
    assert any("colourless training data of grey" in n for n in pred.notes)
