"""TensorBoard val scenes: a tiny training run logs, per evaluated dataset, its first val scene
as point clouds (``val_scene/<dataset>/pred`` at every evaluation, ``.../gt`` once), the same
subsampled points each time, coloured by ``palette`` (ignored labels grey)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ppt.config import load_config
from ppt.data.clouds import IGNORE_RGB, palette
from ppt.engine import checkpoint as ckpt_io
from ppt.engine.build import build_model, build_val_datasets
from ppt.engine.evaluate import evaluate
from ppt.engine.logging import SCENE_POINTS, ValScenes, scene_subsample
from ppt.engine.trainer import train

TINY = ["model.channels=[8,8,16,16,16,16,8,8]", "model.layers=[1,1,1,1,1,1,1,1]", "model.prompt_dim=16",
        "model.head=decoupled", "model.zero_init=false", "data.voxel_size=0.1", "data.num_workers=0",
        "data.mix3d_prob=0.0", "data.check=false", "train.device=cpu", "train.threads=1", "train.log_every=1"]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def mesh_events(exp_dir) -> dict[str, list[tuple[int, np.ndarray]]]:
    """{tag: [(step, array)]} of the tensor summaries ``add_mesh`` wrote (``<tag>_VERTEX``, ...)."""
    from tensorboard.backend.event_processing import event_accumulator as ea
    from tensorboard.util import tensor_util

    acc = ea.EventAccumulator(str(exp_dir), size_guidance={ea.TENSORS: 0})
    acc.Reload()
    return {tag: [(e.step, tensor_util.make_ndarray(e.tensor_proto)) for e in acc.Tensors(tag)]
            for tag in acc.Tags()["tensors"]}


def test_training_logs_the_first_val_scene_of_each_dataset(synthetic_root, tmp_path):
    cfg = load_config(None, [f"data.root={synthetic_root}", "data.mix={scannet: 1, s3dis: 1}", "data.batch_size=2",
                             *TINY, "train.epochs=2", "train.steps_per_epoch=1", "train.eval_every=1"])
    exp_dir = tmp_path / "exp"
    summary = train(cfg, exp_dir)
    events = mesh_events(exp_dir)
    steps = [1, 2]  # one step per epoch (train.steps_per_epoch=1), evaluated after each
    assert summary["steps"] == steps[-1]

    model = build_model(cfg)
    model.load_state_dict(ckpt_io.load_checkpoint(exp_dir / "model" / "model_last.pth")["model"])
    for name, ds in build_val_datasets(cfg).items():
        raw = ds.load(0)
        n = len(raw["coord"])
        assert n > SCENE_POINTS  # the synthetic rooms exercise the subsampling
        index = scene_subsample(n)
        colours = palette(len(ds.info.class_names))
        pred_v, pred_c = events[f"val_scene/{name}/pred_VERTEX"], events[f"val_scene/{name}/pred_COLOR"]
        gt_v, gt_c = events[f"val_scene/{name}/gt_VERTEX"], events[f"val_scene/{name}/gt_COLOR"]
        # pred at every evaluation, gt (never changes) at the first; always the same points
        assert [s for s, _ in pred_v] == [s for s, _ in pred_c] == steps
        assert [s for s, _ in gt_v] == [s for s, _ in gt_c] == steps[:1]
        for _, vertices in pred_v + gt_v:
            assert vertices.shape == (1, SCENE_POINTS, 3)
            np.testing.assert_array_equal(vertices[0], raw["coord"][index])
        segment = raw["segment"][index]
        np.testing.assert_array_equal(gt_c[0][1][0], colours[segment])  # -1 -> the last row, grey
        if name == "scannet":  # the synthetic ScanNet room has ignored points: grey in gt
            assert (segment < 0).any() and (gt_c[0][1][0][segment < 0] == IGNORE_RGB).all()
        # the last evaluation ran the weights of model_last.pth: its predictions, in palette colours
        pred = evaluate(model, ds, "cpu", voxel_size=cfg.data.voxel_size, features=tuple(cfg.data.features),
                        amp_dtype=None, keep_predictions=True)["predictions"][raw["name"]][index]
        np.testing.assert_array_equal(pred_c[-1][1][0], colours[pred])


class _Info:
    class_names = ("a", "b", "c")


class _Val:
    """A val set of two scenes (``scenes`` / ``scene_name`` as ``SceneDataset``)."""
    info, scenes = _Info(), ["first", "second"]

    def scene_name(self, folder):
        return folder


class _Writer:
    def __init__(self):
        self.meshes = []

    def add_mesh(self, tag, vertices, colors, config_dict, global_step):
        self.meshes.append((tag, vertices.shape, colors.dtype, global_step))


def test_val_scenes_keep_only_the_first_scene_subsampled():
    rng = np.random.default_rng(0)
    scenes = ValScenes({"toy": _Val()}, max_points=10)
    hook = scenes.hook("toy")
    second = {"name": "second", "coord": rng.random((50, 3)), "segment": None, "pred": rng.integers(0, 3, 50)}
    first = {"name": "first", "coord": rng.random((40, 3)), "segment": rng.integers(-1, 3, 40),
             "pred": rng.integers(0, 3, 40)}
    hook(second)  # finished first (loader workers interleave), but not the first scene
    hook(first)
    kept = scenes.kept["toy"]
    index = scene_subsample(40, 10)
    np.testing.assert_array_equal(kept["coord"], first["coord"][index].astype(np.float32))
    np.testing.assert_array_equal(kept["segment"], first["segment"][index])
    writer = _Writer()
    scenes.log(writer, 7)
    hook(first)
    scenes.log(writer, 8)
    assert writer.meshes == [("val_scene/toy/pred", (1, 10, 3), np.uint8, 7),
                             ("val_scene/toy/gt", (1, 10, 3), np.uint8, 7),
                             ("val_scene/toy/pred", (1, 10, 3), np.uint8, 8)]  # gt once
    assert not scenes.kept  # nothing held between evaluations
    np.testing.assert_array_equal(scene_subsample(40, 10), index)  # the same points every time
