"""Engine: per-group schedules, non-finite steps, checkpoint errors, synchronised BN and
2-process torchrun training equal to single-process training."""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from ppt.config import OptimConfig, load_config
from ppt.engine import checkpoint as ckpt_io
from ppt.engine.build import build_model, build_optimizer, build_scheduler, build_train_loader
from ppt.engine.precision import amp_settings
from ppt.engine.trainer import NonFiniteError, TrainState, train, train_one_epoch, train_step

REPO = Path(__file__).resolve().parents[1]
TINY = ["model.channels=[8,8,16,16,16,16,8,8]", "model.layers=[1,1,1,1,1,1,1,1]", "model.prompt_dim=16",
        "model.head=decoupled", "model.zero_init=false", "data.voxel_size=0.1", "data.num_workers=0",
        "data.mix3d_prob=0.0", "data.check=false", "train.device=cpu", "train.threads=1",
        "train.eval_every=0", "train.log_every=1"]
# 2 processes sum BN statistics and gradients in another order than one process: float32
# round-off only, measured at ~6.7e-7 after 4 SGD steps (lr 0.1). Tiny batches amplify
# round-off: after 8 steps it is ~1e-4, the same as one process run with 2 threads vs 1.
DDP_TOLERANCE = 1e-5


def tiny_config(root, *extra):
    return load_config(None, [f"data.root={root}", "data.mix={scannet: 1, s3dis: 1}", "data.batch_size=2",
                              *TINY, *extra])


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: the CI box has 2 cores shared with other jobs, and spinning OpenMP
    threads on an oversubscribed CPU make spconv 10-100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class _Logger:
    """Collects log lines (the engine's ExperimentLogger API used by train_one_epoch)."""

    def __init__(self):
        self.lines = []

    def info(self, msg):
        self.lines.append(msg)

    def scalars(self, values, step):
        pass

    def progress(self, total, desc):
        from ppt.engine.logging import _NoBar
        return _NoBar()


class Poisoned(nn.Module):
    """Wraps a model; its logits become NaN while ``poison`` is set (a diverging step)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.poison = model, False

    def forward(self, batch):
        logits = self.model(batch)
        return logits * float("nan") if self.poison else logits


def test_prompt_group_peaks_at_a_tenth_of_the_base_lr(synthetic_root):
    cfg = tiny_config(synthetic_root, "model.prompt=pdnorm")
    model = build_model(cfg)
    for scheduler in ("onecycle", "cosine"):
        cfg.optim.scheduler = scheduler
        opt = build_optimizer(model, cfg.optim)
        names = [g["name"] for g in opt.param_groups]
        assert names == ["base", "prompt"]
        prompt_ids = {id(p) for p in model.prompt_parameters()}
        assert {id(p) for p in opt.param_groups[1]["params"]} == prompt_ids and prompt_ids
        sched = build_scheduler(opt, cfg.optim, total_steps=100)
        lrs = []
        for _ in range(100):
            lrs.append([g["lr"] for g in opt.param_groups])
            opt.step()
            sched.step()
        peak = max(l[0] for l in lrs)
        assert math.isclose(peak, cfg.optim.lr, rel_tol=1e-3)
        assert math.isclose(max(l[1] for l in lrs), 0.1 * cfg.optim.lr, rel_tol=1e-3)
        assert all(math.isclose(b * 0.1, p, rel_tol=1e-6) for b, p in lrs)  # ratio held all along
        assert lrs[-1][0] < peak / 100


@pytest.mark.parametrize("total", [1, 2, 3, 20])
def test_onecycle_survives_runs_too_short_for_its_warmup(total):
    # pct_start 0.05 of 20 steps is a one-step warm-up: OneCycleLR divided by zero there.
    cfg = OptimConfig(name="adamw", lr=0.01, scheduler="onecycle", pct_start=0.05)
    opt = torch.optim.AdamW([{"params": [torch.nn.Parameter(torch.ones(1))], "max_lr": 0.01}], lr=0.01)
    sched = build_scheduler(opt, cfg, total)
    lrs = []
    for _ in range(total):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step() if len(lrs) < total else None
    assert all(math.isfinite(lr) and 0 < lr <= 0.01 + 1e-12 for lr in lrs)
    if total >= 3:
        assert max(lrs) > lrs[0] and lrs[-1] < max(lrs)  # still rises, then anneals


def test_data_elastic_reaches_every_training_pipeline(synthetic_root):
    """``data.elastic=false`` drops elastic distortion from each dataset's training pipeline
    and keeps the rest (a key that is parsed but not passed on would leave it in)."""
    from ppt.data.elastic import ElasticDistortion
    from ppt.data.transforms import RandomRotate

    def kinds(cfg):
        loader = build_train_loader(cfg)
        return {name: [type(t) for t in ds.transform.transforms] for name, ds in loader.datasets.items()}

    on, off = kinds(tiny_config(synthetic_root)), kinds(tiny_config(synthetic_root, "data.elastic=false"))
    assert set(on) == set(off) == {"scannet", "s3dis"}
    for name in on:
        assert ElasticDistortion in on[name] and ElasticDistortion not in off[name]
        assert [k for k in on[name] if k is not ElasticDistortion] == off[name]
        assert RandomRotate in off[name]


def test_nonfinite_steps_are_skipped_counted_and_stop_the_run(synthetic_root):
    cfg = tiny_config(synthetic_root, "train.max_nonfinite=3", "train.epochs=4")
    torch.manual_seed(0)
    model = Poisoned(build_model(cfg))
    loader = build_train_loader(cfg)
    opt = build_optimizer(model.model, cfg.optim)
    sched = build_scheduler(opt, cfg.optim, 100)
    amp_dtype, scaler = amp_settings(torch.device("cpu"), cfg.train.amp)
    assert amp_dtype is None and not scaler.is_enabled()  # fp32 on CPU, same code path

    batch = next(iter(loader))
    before = {k: v.clone() for k, v in model.state_dict().items() if v.is_floating_point()}
    model.poison = True
    out = train_step(model, batch, opt, scaler, amp_dtype, grad_clip=1.0)
    assert not out["finite"] and math.isnan(out["loss"])
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if "running" not in k)  # no update
    model.poison = False
    assert train_step(model, batch, opt, scaler, amp_dtype, grad_clip=1.0)["finite"]

    # two bad steps then good ones: counted, not fatal
    state, log = TrainState(), _Logger()
    model.poison = True
    cfg.train.steps_per_epoch = 2
    loader.set_epoch(1)
    stats = train_one_epoch(model, loader, opt, sched, scaler, None, state, cfg, torch.device("cpu"), log)
    assert stats["skipped"] == 2 and state.nonfinite_steps == 2 and state.consecutive_nonfinite == 2
    assert sum("step skipped" in line for line in log.lines) == 2
    model.poison = False
    state.epoch = 1
    loader.set_epoch(2)
    stats = train_one_epoch(model, loader, opt, sched, scaler, None, state, cfg, torch.device("cpu"), log)
    assert stats["skipped"] == 0 and state.consecutive_nonfinite == 0 and math.isfinite(stats["loss"])
    # max_nonfinite (3) in a row: a clear stop
    model.poison = True
    cfg.train.steps_per_epoch = 4
    loader.set_epoch(3)
    with pytest.raises(NonFiniteError, match="3 consecutive steps had a non-finite loss or gradient"):
        train_one_epoch(model, loader, opt, sched, scaler, None, state, cfg, torch.device("cpu"), log)


def test_corrupt_and_mismatched_checkpoints_name_file_and_reason(synthetic_root, tmp_path):
    cfg = tiny_config(synthetic_root)
    model = build_model(cfg)
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ckpt_io.CheckpointError, match=f"checkpoint {bad} is corrupt"):
        ckpt_io.load_checkpoint(bad)
    with pytest.raises(ckpt_io.CheckpointError, match="does not exist"):
        ckpt_io.load_checkpoint(tmp_path / "missing.pth")

    wide = build_model(tiny_config(synthetic_root, "model.channels=[8,8,16,16,16,16,8,16]"))
    path = tmp_path / "wide.pth"
    ckpt_io.atomic_save({"model": wide.state_dict()}, path)
    with pytest.raises(ckpt_io.CheckpointError, match=r"does not fit this model: .*shape mismatches"):
        ckpt_io.load_model_state(model, ckpt_io.load_checkpoint(path)["model"], path)
    with pytest.raises(ckpt_io.CheckpointError, match="cannot be resumed from: it lacks optimizer"):
        ckpt_io.check_resumable(ckpt_io.load_checkpoint(path), path)

    # fine-tuning: matching tensors load, mismatches are reported and keep their init
    from ppt.engine.weights import load_weights

    report = load_weights(model, path)
    assert report.startswith(f"loaded ") and "shape mismatches kept initialised" in report
    stem = "backbone.stem.conv.weight"
    assert torch.equal(model.state_dict()[stem], wide.state_dict()[stem])


def test_sync_batchnorm_is_batchnorm_on_one_process():
    from ppt.engine.distributed import SyncBatchNorm1d, convert_sync_batchnorm

    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, eps=1e-3, momentum=0.01))
    ref = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, eps=1e-3, momentum=0.01))
    ref.load_state_dict(net.state_dict())
    convert_sync_batchnorm(net)
    assert isinstance(net[1], SyncBatchNorm1d) and net[1].momentum == 0.01
    assert set(net.state_dict()) == set(ref.state_dict())
    x = torch.randn(50, 3)
    assert torch.allclose(net(x), ref(x))
    assert torch.allclose(net[1].running_var, ref[1].running_var)


def test_torchrun_two_processes_match_one_process(synthetic_root, tmp_path):
    """Same scenes, same seed: 2 gloo processes (batch 1 each, synchronised BN, global-mean
    loss, DDP with unused parameters) end with the weights of 1 process (batch 2)."""
    overrides = [f"data.root={synthetic_root}", "data.mix={scannet: 1, s3dis: 1}", "data.batch_size=2",
                 *TINY, "model.prompt=pdnorm", "train.epochs=1", "optim.lr=0.1"]
    cfg = load_config(None, overrides)
    single = train(cfg, tmp_path / "exp" / "single")
    assert single["steps"] == 4  # 2 batches x 2 datasets: both datasets' BNs and heads train

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "tools" / "train.py"), "--config", str(tmp_path / "exp" / "single" / "config.yaml"),
           "--name", "ddp", "--exp-root", str(tmp_path / "exp")]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = ckpt_io.load_checkpoint(tmp_path / "exp" / "single" / "model" / "model_last.pth")
    b = ckpt_io.load_checkpoint(tmp_path / "exp" / "ddp" / "model" / "model_last.pth")
    assert a["step"] == b["step"] == 4 and len(b["rng"]) == 2
    diffs = {k: (a["model"][k].double() - b["model"][k].double()).abs().max().item()
             for k in a["model"] if a["model"][k].is_floating_point()}
    moved = {k: (a["model"][k].double() - build_model(cfg).state_dict()[k].double()).abs().max().item()
             for k in ("backbone.stem.conv.weight", "backbone.stem.norm.norms.s3dis.running_mean")}
    assert min(moved.values()) > 1e-3  # training changed weights and per-dataset BN statistics
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] < DDP_TOLERANCE, f"{worst} differs by {diffs[worst]:.3g}"
