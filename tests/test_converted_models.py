"""A converted model of every reference type is an experiment like any other: ``tools/test.py``
evaluates it, ``tools/infer.py`` labels a cloud with it, ``tools/train.py --weights`` fine-tunes
from it, and ``--peft dapt`` / ``pointpeft`` / ``lora`` / ``decoder`` adapt it (SpUNet and PTv3 types).

The models are the conversion fixtures (tiny reference models with random weights, made by
bench/pointcept_parity*.py); the point is that every path accepts them (bugs caught: a converted
folder missing what a tool reads, e.g. text embeddings a language head needs offline, the
features or voxel size, a config the trainer refuses, stage code that trips on converted names).
"""
from __future__ import annotations

import importlib.util
import pprint
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "pointcept"
sys.path.insert(0, str(REPO))
from bench.pointcept_parity_ptv3 import unpack  # noqa: E402


def tool(name: str):
    spec = importlib.util.spec_from_file_location(f"ppt_tool_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SPUNET = ["spunet_v1m1", "ppt_v1m1_spunet_v1m3"]
PTV3 = sorted(p.stem for p in (FIXTURES / "ptv3").glob("*.pth") if p.stem != "batch")
FAST = ["data.voxel_size=0.1", "data.num_workers=0", "data.mix3d_prob=0.0", "data.check=false",
        "data.batch_size=2", "train.device=cpu", "train.threads=1", "train.epochs=1", "train.eval_every=0",
        "train.precise_bn=0", "train.amp=false", "data.crop_points={scannet: 4000, s3dis: 4000, structured3d: 4000}"]


def reference_files(case: str, folder: Path) -> tuple[Path, Path]:
    """(checkpoint, config) of a fixture as a user has them: a Pointcept checkpoint file and
    the Python config."""
    if case in SPUNET:
        return FIXTURES / "spunet" / f"{case}.pth", FIXTURES / "spunet" / f"{case}.py"
    fixture = torch.load(FIXTURES / "ptv3" / f"{case}.pth", weights_only=False)
    ckpt, config = folder / f"{case}.pth", folder / f"{case}.py"
    torch.save({"state_dict": unpack(fixture["state"])}, ckpt)
    config.write_text(f"model = {pprint.pformat(fixture['case']['model'])}\n"
                      f"data = {pprint.pformat(fixture['case']['data'])}\n")
    return ckpt, config


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """case -> converted experiment folder; the text-embedding cache ($PPT_CACHE) is private
    to this module (the converter writes the PPT models' class embeddings there)."""
    root = tmp_path_factory.mktemp("converted")
    convert = tool("convert")
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PPT_CACHE", str(root / "cache"))
        for case in SPUNET + PTV3:
            ckpt, config = reference_files(case, root)
            assert convert.main([str(ckpt), "--config", str(config), "--name", case, "--exp-root", str(root)]) == 0
            out[case] = root / case
        yield out


@pytest.mark.parametrize("case", SPUNET + PTV3)
def test_test_infer_and_fine_tune_take_a_converted_model(case, converted, synthetic_root, tmp_path, capsys):
    from ppt.config import load_config

    exp = converted[case]
    cfg = load_config(exp / "config.yaml", [])
    dataset = list(cfg.data.mix)[0]
    assert tool("test").main(["--exp", str(exp), "--data-root", str(synthetic_root), "--dataset", dataset]) == 0
    assert f"{dataset}" in capsys.readouterr().out

    rng = np.random.default_rng(0)
    cloud = np.concatenate([rng.uniform([0, 0, 0], [4, 3, 2.5], (2000, 3)),
                            rng.integers(0, 256, (2000, 3))], 1).astype(np.float32)
    np.save(tmp_path / "cloud.npy", cloud)
    assert tool("infer").main([str(tmp_path / "cloud.npy"), "--exp", str(exp), "--out", str(tmp_path / "out"),
                               "--device", "cpu"]) == 0
    assert list((tmp_path / "out").iterdir())

    weights = str(exp / "model" / "model_best.pth")
    train = tool("train")
    assert train.main(["--config", str(exp / "config.yaml"), "--weights", weights, "--name", "ft",
                       "--exp-root", str(tmp_path), f"data.root={synthetic_root}", *FAST]) == 0
    assert (tmp_path / "ft" / "model" / "model_last.pth").is_file()
    for stage in ("dapt", "pointpeft", "lora", "decoder"):
        if stage == "decoder" and "encoder_mode" in case:
            continue  # no decoder to probe (tested below)
        assert train.main(["--peft", stage, "--weights", weights, "--datasets", dataset, "--name", stage,
                           "--exp-root", str(tmp_path), "--data-root", str(synthetic_root), *FAST]) == 0
        assert (tmp_path / stage / "model" / "model_last.pth").is_file()


def test_decoder_probing_an_encoder_only_model_is_refused(converted, synthetic_root, tmp_path, capsys):
    """Bug caught: ``--peft decoder`` on an encoder-only model silently training the head alone
    (linear probing under another name)."""
    weights = str(converted["pt-v3m2_encoder_mode"] / "model" / "model_best.pth")
    rc = tool("train").main(["--peft", "decoder", "--weights", weights, "--datasets", "scannet", "--name", "d",
                             "--exp-root", str(tmp_path), "--data-root", str(synthetic_root), *FAST])
    err = capsys.readouterr().err
    assert rc != 0 and "error:" in err and "decoder" in err and "Traceback" not in err
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("case", ["spunet_v1m1", next(c for c in PTV3 if "ppt" not in c)])
def test_a_users_dataset_is_a_peft_target_of_a_converted_model(case, converted, synthetic_root, tmp_path, capsys):
    """A released model adapted to a user's own dataset (a folder with a dataset.yaml, class names
    the model never saw): the new domain starts from the base's (mean) domain, the run validates
    under the user's names. (A converted PPT model's language head needs CLIP text embeddings of
    the new names: one error line says how to get them without network; tested in test_text.)"""
    from test_own_dataset import OWN, make_own

    make_own(tmp_path / "data", synthetic_root / "s3dis", "mine")
    weights = str(converted[case] / "model" / "model_best.pth")
    assert tool("train").main(["--peft", "dapt", "--weights", weights, "--datasets", "mine", "--name", "mine",
                               "--exp-root", str(tmp_path), "--data-root", str(tmp_path / "data"),
                               *FAST[:-1], "train.eval_every=1"]) == 0
    log = (tmp_path / "mine" / "train.log").read_text()
    assert "mine<-mean of" in log and "val mine epoch 1" in log and f"{OWN[3]}=" in log
