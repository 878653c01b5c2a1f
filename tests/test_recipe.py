"""Fidelity of the training recipe to the reference: loss scaling under AMP, untrained domains,
model_best by the main dataset, OneCycle momentum cycling, precise BN, resume rules, --plan and
the joint epoch as a user runs it."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from ppt.config import load_config, save_config
from ppt.data.mixing import MultiDatasetLoader, _Steps
from ppt.engine.build import build_model, build_optimizer, build_scheduler
from ppt.engine.precise_bn import precise_bn_plan, update_bn_stats
from ppt.engine.precision import amp_policy
from ppt.engine.trainer import best_metric, evaluate_all

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("ppt_train_tool", REPO / "tools" / "train.py")
train_tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_tool)
TINY = ["model.channels=[8,8,16,16,16,16,8,8]", "model.layers=[1,1,1,1,1,1,1,1]", "model.prompt_dim=16",
        "model.head=decoupled", "data.voxel_size=0.1", "data.num_workers=0", "data.mix3d_prob=0.0",
        "data.check=false", "train.device=cpu", "train.threads=1", "train.eval_every=0",
        "train.log_every=1"]


class Result:
    def __init__(self, returncode: int, stdout: str, stderr: str):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


@pytest.fixture
def train_py(capsys, monkeypatch):
    """``tools/train.py`` run in this process (its ``main``), from the repository root: the
    same code path as the command line without paying for a new interpreter and spconv."""
    monkeypatch.chdir(REPO)

    def run(*args) -> Result:
        rc = train_tool.main([str(a) for a in args])
        out = capsys.readouterr()
        return Result(rc, out.out, out.err)
    return run


# ---- mixed precision

@pytest.mark.parametrize("device, enabled, bf16, expected", [
    ("cuda", True, True, (torch.bfloat16, True)),    # spconv runs fp16 convs under bf16 autocast too
    ("cuda", True, False, (torch.float16, True)),
    ("cuda", False, True, (None, False)),
    ("cpu", True, True, (None, False)),
])
def test_loss_scaling_whenever_autocast_runs(device, enabled, bf16, expected):
    assert amp_policy(device, enabled, bf16) == expected


# ---- evaluation and model_best

def test_model_best_follows_the_main_dataset_or_the_mean():
    results = {"scannet": {"mIoU": 0.30}, "s3dis": {"mIoU": 0.70}, "structured3d": {"mIoU": 0.20}}
    assert best_metric(results, "first") == (0.30, "scannet val mIoU")
    assert best_metric(results, "s3dis")[0] == 0.70
    assert best_metric(results, "mean")[0] == pytest.approx(0.40)


def test_best_on_must_name_an_evaluated_dataset():
    from ppt.config import ConfigError

    with pytest.raises(ConfigError, match="train.best_on"):
        load_config(None, ["data.mix={scannet: 1}", "train.best_on=s3dis"])


def test_validated_but_untrained_dataset_uses_the_mean_prompt(synthetic_root):
    cfg = load_config(None, [f"data.root={synthetic_root}", "data.mix={scannet: 1}", "data.val=[scannet, s3dis]",
                             *TINY, "model.prompt=pdnorm", "model.head=language"])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    assert model.domains == ("scannet", "s3dis")
    # Give the trained domain distinct statistics: "mean" (a mixture) then differs from s3dis's
    # own untouched BN (mean 0, var 1) and random prompt.
    for name, buf in model.named_buffers():
        if ".norms.scannet." in name and name.endswith("running_mean"):
            buf.fill_(2.0)
    from ppt.engine.build import build_val_datasets
    from ppt.engine.evaluate import evaluate

    val = build_val_datasets(cfg)
    results = evaluate_all(model, val, cfg, torch.device("cpu"), None)
    assert results["scannet"]["prompt"] == "scannet" and results["s3dis"]["prompt"] == "mean"
    mean = evaluate(model, val["s3dis"], "cpu", prompt="mean", voxel_size=0.1, amp_dtype=None)
    own = evaluate(model, val["s3dis"], "cpu", prompt="s3dis", voxel_size=0.1, amp_dtype=None)
    assert np.array_equal(results["s3dis"]["confusion"], mean["confusion"])
    assert not np.array_equal(results["s3dis"]["confusion"], own["confusion"])


# ---- schedule

def test_onecycle_cycles_momentum_like_the_reference(synthetic_root):
    cfg = load_config(None, [f"data.root={synthetic_root}", "data.mix={scannet: 1}", *TINY])
    model = build_model(cfg)
    for name, key in (("sgd", "momentum"), ("adamw", "betas")):
        cfg.optim.name = name
        opt = build_optimizer(model, cfg.optim)
        sched = build_scheduler(opt, cfg.optim, total_steps=100)
        values = []
        for _ in range(100):
            m = opt.param_groups[0][key]
            values.append(m[0] if key == "betas" else m)
            opt.step()
            sched.step()
        assert values[0] == pytest.approx(0.95) and min(values) == pytest.approx(0.85, abs=1e-3)
        assert values[-1] == pytest.approx(0.95, abs=1e-3)   # back up as the lr anneals
        assert int(np.argmin(values)) == 4                   # lowest at the lr peak (pct_start 0.05)
    cfg.optim.cycle_momentum = False
    cfg.optim.name = "sgd"
    opt = build_optimizer(model, cfg.optim)
    sched = build_scheduler(opt, cfg.optim, total_steps=10)
    opt.step()
    sched.step()
    assert opt.param_groups[0]["momentum"] == cfg.optim.momentum


# ---- precise BN

class Toy:
    """Dataset whose features have a dataset-specific mean and scale (6 channels)."""

    def __init__(self, name: str, size: int, loc: float, scale: float):
        self.name, self.size, self.loc, self.scale = name, size, loc, scale

    def __len__(self):
        return self.size

    def get(self, i, rng=None):
        n = 50 + i
        return {"coord": np.zeros((n, 3), np.float32), "grid_coord": np.zeros((n, 3), np.int32),
                "feat": (self.loc + self.scale * rng.standard_normal((n, 6))).astype(np.float32),
                "segment": np.zeros(n, np.int64), "dataset": self.name, "name": f"{self.name}-{i}"}


class PerDatasetBN(nn.Module):
    """A BN per dataset on the raw features, plus an idle one (a domain never trained)."""

    def __init__(self):
        super().__init__()
        self.norms = nn.ModuleDict({d: nn.BatchNorm1d(6, momentum=0.01) for d in ("a", "b", "idle")})
        self.drop = nn.Dropout(0.5)

    def forward(self, batch):
        return self.drop(self.norms[batch["dataset"]](batch["feat"]))


def test_precise_bn_averages_each_datasets_own_batch_statistics():
    datasets = {"a": Toy("a", 9, 5.0, 1.0), "b": Toy("b", 7, -3.0, 2.0)}
    loader = MultiDatasetLoader(datasets, {"a": 2, "b": 1}, batch_size=2, seed=3, mix3d_prob=0.0)
    model = PerDatasetBN().train()
    idle = model.norms["idle"].running_mean.clone()
    info = update_bn_stats(model, loader, num_batches=4, device=torch.device("cpu"), epoch=1)
    assert info["batches"] == 8 and info["norms"] == 2
    # Expected: plain average over the 4 batches of each dataset of the batch mean / unbiased var.
    steps = _Steps(datasets, precise_bn_plan(loader, 4, 1), 0, loader.seed, 1, 0.0)
    for name in ("a", "b"):
        feats = [steps[k]["feat"] for k in range(len(steps)) if steps[k]["dataset"] == name]
        assert len(feats) == 4
        mean = torch.stack([f.mean(0) for f in feats]).mean(0)
        var = torch.stack([f.var(0, unbiased=True) for f in feats]).mean(0)
        assert torch.allclose(model.norms[name].running_mean, mean, atol=1e-5)
        assert torch.allclose(model.norms[name].running_var, var, atol=1e-4)
    assert torch.equal(model.norms["idle"].running_mean, idle)       # never saw a batch
    assert model.training and model.norms["a"].momentum == 0.01       # modes and momentum restored
    assert loader.position == 0 and loader.epoch == 0                  # training position untouched


def test_precise_bn_batches_are_seeded_apart_from_training():
    datasets = {"a": Toy("a", 9, 5.0, 1.0), "b": Toy("b", 7, -3.0, 2.0)}
    loader = MultiDatasetLoader(datasets, {"a": 2, "b": 1}, batch_size=2, seed=3, mix3d_prob=0.0)
    plan = precise_bn_plan(loader, 5, epoch=0)
    assert [p.dataset for p in plan] == ["a"] * 5 + ["b"] * 5      # more batches than b has: cycled
    assert plan[0].pass_index != loader.plan(0)[0].pass_index
    assert precise_bn_plan(loader, 5, epoch=1)[0].indices.tolist() != plan[0].indices.tolist() or \
        precise_bn_plan(loader, 5, epoch=1)[1].indices.tolist() != plan[1].indices.tolist()


# ---- the command line: the joint epoch, --plan, resume rules

@pytest.fixture(scope="module")
def unequal_root(tmp_path_factory):
    """structured3d / scannet / s3dis with 40 / 10 / 4 training scenes."""
    from ppt.data.synthetic import generate

    root = tmp_path_factory.mktemp("unequal")
    generate(root, 50, 0, domains=("structured3d",))
    generate(root, 12, 0, domains=("scannet",))
    generate(root, 5, 0, domains=("s3dis",))
    return root


def test_joint_epoch_is_one_pass_over_the_first_dataset(unequal_root, tmp_path, train_py):
    # The acceptance command (a smaller model and coarser voxels to keep it quick).
    proc = train_py("--config", "configs/demo.yaml", "--datasets", "structured3d:4,scannet:2,s3dis:1",
                         "--data-root", str(unequal_root), "--exp-root", str(tmp_path), "--name", "joint",
                         "train.epochs=1", "data.batch_size=2", "data.loop=1", "train.eval_every=0",
                         "data.num_workers=0", "model.channels=[8,8,8,8,8,8,8,8]", "model.prompt_dim=8",
                         "data.voxel_size=0.3", "train.precise_bn=0")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "done: 1 epochs, 35 steps" in proc.stdout
    plan = train_py("--config", "configs/demo.yaml", "--datasets", "structured3d:4,scannet:2,s3dis:1",
                         "--data-root", str(unequal_root), "--plan", "data.batch_size=2", "data.loop=1")
    assert plan.returncode == 0, plan.stderr
    assert "35 per epoch" in plan.stdout and "one pass over structured3d" in plan.stdout


def test_plan_from_published_sizes_matches_the_reference_length(train_py):
    proc = train_py("--config", "configs/ppt_joint.yaml", "--plan", "--world-size", "8", "--sizes",
                         "structured3d:18000/1700,scannet:1201/312,s3dis:204/68")
    assert proc.returncode == 0, proc.stderr
    # reference: len(first) // ratio * sum(ratios) + remainder, len(first) = 18000 / 8 / 3 = 750
    assert f"{750 // 4 * 7 + 750 % 4:,} per epoch x 100 epochs" in proc.stdout
    bad = train_py("--config", "configs/ppt_joint.yaml", "--plan", "--sizes", "scannet:12")
    assert bad.returncode == 2 and bad.stderr.startswith("error: --sizes has no count for")


def test_data_root_hint_names_the_child_folder(synthetic_root, tmp_path, train_py):
    parent = tmp_path / "data"
    parent.mkdir()
    (parent / "synthetic").symlink_to(synthetic_root)
    proc = train_py("--config", "configs/demo.yaml", "--data-root", str(parent),
                         "--exp-root", str(tmp_path / "exp"))
    assert proc.returncode == 2
    assert f"did you mean --data-root {parent / 'synthetic'}?" in proc.stderr


def test_data_check_names_the_child_folder_too(synthetic_root, tmp_path):
    # tools/check_data.py data and tools/test.py --data-root data after the demo wrote data/synthetic
    from ppt.data.check import check_data_root

    (tmp_path / "synthetic").symlink_to(synthetic_root)
    (tmp_path / "empty").mkdir()
    hint = f"did you mean --data-root {tmp_path / 'synthetic'}?"
    assert hint in check_data_root(tmp_path, quick=True, raise_on_error=False).problems[0]
    problems = check_data_root(tmp_path, ["scannet"], ["val"], quick=True, raise_on_error=False).problems
    assert hint in problems[0]
    assert "did you mean" not in check_data_root(tmp_path / "empty", quick=True, raise_on_error=False).problems[0]


def test_resume_may_extend_epochs_but_not_change_the_lr(synthetic_root, tmp_path, train_py):
    cfg = load_config(None, [f"data.root={synthetic_root}", "data.mix={scannet: 1}", *TINY,
                             "data.batch_size=2", "train.epochs=1", "optim.name=adamw", "optim.lr=0.01"])
    config = tmp_path / "c.yaml"
    save_config(cfg, config)
    first = train_py("--config", str(config), "--exp-root", str(tmp_path), "--name", "r")
    assert first.returncode == 0, first.stderr[-2000:]
    saved = (tmp_path / "r" / "config.yaml").read_text()
    ckpt_before = (tmp_path / "r" / "model" / "model_last.pth").stat().st_mtime_ns

    refused = train_py("--resume", "--name", "r", "--exp-root", str(tmp_path), "optim.lr=0.02")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert refused.stderr.startswith("error: --resume cannot change optim.lr: 0.01 -> 0.02")
    assert (tmp_path / "r" / "config.yaml").read_text() == saved            # nothing rewritten
    assert (tmp_path / "r" / "model" / "model_last.pth").stat().st_mtime_ns == ckpt_before

    longer = train_py("--resume", "--name", "r", "--exp-root", str(tmp_path), "train.epochs=3")
    assert longer.returncode == 0, longer.stderr[-2000:]
    assert "done: 3 epochs" in longer.stdout
    log = (tmp_path / "r" / "train.log").read_text()
    assert "train.epochs 1 -> 3: lr schedule re-planned" in log
    ckpt = torch.load(tmp_path / "r" / "model" / "model_last.pth", weights_only=True)
    assert ckpt["config"]["train"]["epochs"] == 3 and "epochs: 3" in (tmp_path / "r" / "config.yaml").read_text()
    assert ckpt["scheduler"]["total_steps"] == ckpt["step"]   # 3 epochs planned, 3 done


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}


def check_scaled_step(device: str, amp: str, root) -> None:
    """``train_step`` under autocast back-propagates loss x scale and unscales before clipping
    and stepping: the gradients the scaler holds before ``unscale_`` are the unscaled ones x the
    scale (2**16 at first, torch's default), and the unscaled ones match an fp32 backward of the
    same batch at the same weights. A non-finite step halves the scale (backoff 0.5) and leaves
    the weights alone. A step that ran ``loss.backward()`` unscaled ends 2**16 times too small;
    one that skipped ``unscale_`` 2**16 times too large (and clipped by a norm 2**16 too large
    when it left unscaling to ``scaler.step``)."""
    from ppt.engine.build import build_train_loader
    from ppt.engine.precision import amp_settings
    from ppt.engine.trainer import to_device, train_step
    from ppt.losses import segmentation_loss

    cfg = load_config(None, [f"data.root={root}", "data.mix={scannet: 1}", *TINY, "data.batch_size=2",
                             f"train.device={device}", "train.amp=true"])
    torch.manual_seed(0)
    model = build_model(cfg).to(device)
    opt = build_optimizer(model, cfg.optim)
    if amp == "policy":   # what training builds on this device
        amp_dtype, scaler = amp_settings(torch.device(device), True)
        assert amp_dtype in (torch.bfloat16, torch.float16) and scaler.is_enabled()
    else:                 # CPU: the same calls with a CPU scaler (the policy turns both off there)
        amp_dtype, scaler = torch.bfloat16, torch.amp.GradScaler(device)
    batch = to_device(next(iter(build_train_loader(cfg))), torch.device(device))
    segmentation_loss(model(batch).float(), batch["segment"]).backward()   # fp32 reference
    reference = _grads(model)

    seen, unscale = {}, scaler.unscale_

    def recording_unscale_(optimizer):
        seen.update(scale=scaler.get_scale(), scaled=_grads(model))
        unscale(optimizer)
        seen["unscaled"] = _grads(model)

    scaler.unscale_ = recording_unscale_
    out = train_step(model, batch, opt, scaler, amp_dtype, grad_clip=0.0)
    assert out["finite"] and seen.get("scale") == 2.0 ** 16 and scaler.get_scale() == 2.0 ** 16
    assert seen["scaled"].keys() == seen["unscaled"].keys() == reference.keys()
    for name, grad in seen["unscaled"].items():   # x 2**16 is exact in float32
        torch.testing.assert_close(grad * seen["scale"], seen["scaled"][name], rtol=1e-6, atol=1e-30)
    got = torch.cat([seen["unscaled"][n].flatten() for n in reference])
    ref = torch.cat([g.flatten() for g in reference.values()])
    # Round-off of the low-precision ops only (CPU bf16: 0.0017 measured; not yet measured on
    # CUDA, where spconv runs fp16): far below the factor 2**16 of a scaling bug.
    assert ref.norm() > 0 and (got - ref).norm() / ref.norm() < 0.1
    assert abs(out["grad_norm"] / ref.norm() - 1) < 0.1   # clipping measured the unscaled gradient

    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    poisoned = dict(batch, feat=torch.full_like(batch["feat"], float("nan")))
    out = train_step(model, poisoned, opt, scaler, amp_dtype, grad_clip=0.0)
    assert not out["finite"] and scaler.get_scale() == 2.0 ** 15
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())


def test_amp_step_scales_the_loss_on_cpu(synthetic_root):
    check_scaled_step("cpu", "bf16", synthetic_root)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_amp_step_scales_the_loss(synthetic_root):
    check_scaled_step("cuda", "policy", synthetic_root)
