"""What ``train()`` itself does with its parts: it runs precise BN before the final checkpoint,
and the GradScaler it builds follows the precision policy (bf16 included)."""
from __future__ import annotations

import pytest
import torch

from ppt.config import load_config
from ppt.engine import checkpoint as ckpt_io
from ppt.engine import precision
from ppt.engine.build import build_model, build_train_loader
from ppt.engine.precise_bn import batch_norms, update_bn_stats
from ppt.engine.trainer import train

TINY = ["model.channels=[8,8,16,16,16,16,8,8]", "model.layers=[1,1,1,1,1,1,1,1]", "model.prompt_dim=16",
        "model.head=decoupled", "model.zero_init=false", "data.voxel_size=0.1", "data.num_workers=0",
        "data.mix3d_prob=0.0", "data.check=false", "train.device=cpu", "train.threads=1",
        "train.eval_every=0", "train.log_every=1", "train.epochs=1", "optim.lr=0.1"]


def tiny_config(root, *extra):
    return load_config(None, [f"data.root={root}", "data.mix={scannet: 1, s3dis: 1}", "data.batch_size=2",
                              *TINY, *extra])


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread (tests/test_engine.py says why); also makes the two BN passes compared
    below run their sums in the same order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_trainer_runs_precise_bn_before_the_final_checkpoint(synthetic_root, tmp_path):
    """With ``train.precise_bn=2`` the saved BN statistics are the precise-BN averages under the
    saved weights: recomputing them from the checkpoint gives the same numbers. Without the
    trainer's call they are the momentum-0.01 running averages of 4 steps, far from those."""
    cfg = tiny_config(synthetic_root, "train.precise_bn=2")
    summary = train(cfg, tmp_path / "exp")
    assert summary["epochs"] == 1 and summary["steps"] == 4
    saved = ckpt_io.load_checkpoint(tmp_path / "exp" / "model" / "model_last.pth")["model"]

    model = build_model(cfg)
    model.load_state_dict(saved)
    norms = batch_norms(model)
    info = update_bn_stats(model, build_train_loader(cfg), 2, torch.device("cpu"), epoch=1)
    assert info["norms"] == len(norms) > 0  # every BN (both datasets' PDNorm branches) saw batches
    names = {id(m): n for n, m in model.named_modules()}
    for bn in norms:
        name = names[id(bn)]
        for buf in ("running_mean", "running_var"):
            torch.testing.assert_close(saved[f"{name}.{buf}"], getattr(bn, buf), rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"{name}.{buf}: {m}")
    assert "precise BN: recomputed" in (tmp_path / "exp" / "train.log").read_text()


@pytest.mark.parametrize("scaling", [True, False])
def test_trainer_builds_the_scaler_the_bf16_policy_asks_for(synthetic_root, tmp_path, monkeypatch, scaling):
    """The GradScaler ``train()`` builds, steps with and checkpoints follows the policy's loss
    scaling decision under bf16 autocast (on CUDA: on, see ``amp_policy``). This CPU stands in
    for a bf16 CUDA device: the policy is asked as for one (``scaling`` lets it answer no as
    well, so a trainer that always scales fails too); CPU autocast and scaler run the same calls."""
    real = precision.amp_policy
    asked = []

    def bf16_cuda_policy(device_type, enabled, bf16_supported):
        asked.append((device_type, enabled))
        dtype, scale = real("cuda", enabled, True)
        assert dtype == torch.bfloat16 and scale   # the policy's answer on a bf16 GPU
        return dtype, scale and scaling

    monkeypatch.setattr(precision, "amp_policy", bf16_cuda_policy)
    cfg = tiny_config(synthetic_root, "data.mix={scannet: 1}", "train.amp=true")
    summary = train(cfg, tmp_path / "exp")
    assert asked == [("cpu", True)] and summary["steps"] == 2 and summary["skipped_steps"] == 0
    saved = ckpt_io.load_checkpoint(tmp_path / "exp" / "model" / "model_last.pth")["scaler"]
    if scaling:   # enabled: initial scale kept, and 2 finite steps counted by update()
        assert (saved.get("scale"), saved.get("_growth_tracker")) == (2.0 ** 16, 2), saved
    else:
        assert saved == {}   # a disabled scaler's state
    log = (tmp_path / "exp" / "train.log").read_text()
    assert "amp bfloat16" in log and ("amp bfloat16 + loss scaling" in log) == scaling
