"""tools/train.py and tools/train.sh: bad input -> one error line and nothing written; a run
killed with SIGKILL and resumed ends with exactly the weights of an uninterrupted run."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ppt.config import load_config, save_config

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
TINY = ["model.channels=[8,8,16,16,16,16,8,8]", "model.layers=[1,1,1,1,1,1,1,1]", "model.prompt_dim=16",
        "model.head=decoupled", "data.voxel_size=0.1", "data.num_workers=0", "data.batch_size=1",
        "train.device=cpu", "train.threads=1", "train.eval_every=0", "train.log_every=1"]


@pytest.fixture
def tiny_config(synthetic_root, tmp_path):
    """A config file training a tiny PPT model on the session's synthetic root."""
    cfg = load_config(None, [f"data.root={synthetic_root}", "data.mix={scannet: 2, s3dis: 1}", *TINY])
    path = tmp_path / "tiny.yaml"
    save_config(cfg, path)
    return path


def train_cmd(config, exp_root, *args):
    return [sys.executable, str(REPO / "tools" / "train.py"), "--config", str(config),
            "--exp-root", str(exp_root), *args]


def run(cmd, **kwargs):
    return subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=240, **kwargs)


@pytest.mark.parametrize("args, message", [
    (["--datasets", "scannet:2,nuscenes:1"], "unknown dataset 'nuscenes': not built in"),
    (["--datasets", "scannet:1.5"], "ratio of scannet must be a positive integer, got '1.5'"),
    (["--datasets", "scannet:0"], "ratio of scannet must be a positive integer, got '0'"),
    (["--data-root", "/nonexistent/ppt"], "data root /nonexistent/ppt does not exist"),
    (["--weights", "/nonexistent/w.pth"], "--weights file /nonexistent/w.pth does not exist"),
    (["--resume"], "--resume: no checkpoint"),
    (["optim.lrr=0.1"], "unknown config key 'optim.lrr' (command-line override); did you mean 'optim.lr'?"),
    (["train.epochs=x"], "config key 'train.epochs' (command-line override) must be int, got str"),
])
def test_bad_input_is_one_error_line_and_writes_nothing(tiny_config, tmp_path, args, message):
    exp_root = tmp_path / "exp"
    proc = run(train_cmd(tiny_config, exp_root, "--name", "bad", *args))
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not exp_root.exists()


def test_unknown_key_in_config_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  mixx: {scannet: 1}\n")
    proc = run(train_cmd(bad, tmp_path / "exp"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == \
        f"error: unknown config key 'data.mixx' in {bad}; did you mean 'data.mix'?"
    assert not (tmp_path / "exp").exists()


def test_train_sh_validates_before_launch(tmp_path):
    for args, message in [(["--config", "configs/demo.yaml", "--gpus", "two"], "--gpus/--machines must be positive"),
                          (["--config", "configs/demo.yaml", "--machines", "2"], "needs --master ADDR:PORT"),
                          (["--config", str(tmp_path / "none.yaml")], "does not exist"),
                          (["--bogus"], "unknown argument '--bogus'")]:
        proc = run(["bash", str(REPO / "tools" / "train.sh"), *args])
        assert proc.returncode == 2 and proc.stderr.strip().startswith("error:") and message in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1


def test_sigkill_then_resume_equals_uninterrupted_run(tiny_config, tmp_path):
    exp_root = tmp_path / "exp"
    # 6 steps per epoch (scannet 4 scenes at ratio 2, s3dis 4 at ratio 1, batch 1), 2 epochs
    opts = ["train.epochs=2", "train.checkpoint_every=1"]
    full = subprocess.Popen(train_cmd(tiny_config, exp_root, "--name", "full", *opts), cwd=REPO, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    log = exp_root / "killed" / "train.log"
    proc = subprocess.Popen(train_cmd(tiny_config, exp_root, "--name", "killed", *opts), cwd=REPO, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 200
    while time.time() < deadline and proc.poll() is None:
        if log.is_file() and log.read_text().count("saved ") >= 2:
            proc.send_signal(signal.SIGKILL)  # no chance to clean up
            break
        time.sleep(0.02)
    assert proc.wait(timeout=60) == -signal.SIGKILL, "the run ended before it could be killed"
    killed_at = torch.load(exp_root / "killed" / "model" / "model_last.pth", weights_only=True)["step"]
    assert 2 <= killed_at < 12
    assert full.wait(timeout=200) == 0, full.stderr.read()[-3000:]

    again = run(train_cmd(tiny_config, exp_root, "--name", "killed", *opts))  # no --resume
    assert again.returncode == 2 and "pass --resume" in again.stderr
    resumed = run(train_cmd(tiny_config, exp_root, "--name", "killed", "--resume", *opts))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming at epoch" in (exp_root / "killed" / "train.log").read_text()

    a = torch.load(exp_root / "full" / "model" / "model_last.pth", weights_only=True)
    b = torch.load(exp_root / "killed" / "model" / "model_last.pth", weights_only=True)
    assert a["step"] == b["step"] == 12 and a["loader"] == b["loader"]
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), f"{key} differs after resume"
    for key, value in a["optimizer"]["state"].items():
        assert torch.equal(value["momentum_buffer"], b["optimizer"]["state"][key]["momentum_buffer"])
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"]


def test_weights_fine_tune_reports_and_resume_of_corrupt_checkpoint(tiny_config, tmp_path):
    exp_root = tmp_path / "exp"
    base = run(train_cmd(tiny_config, exp_root, "--name", "base", "train.epochs=1", "train.steps_per_epoch=1"))
    assert base.returncode == 0, base.stderr[-3000:]
    weights = exp_root / "base" / "model" / "model_last.pth"
    # fine-tune on one dataset with a wider last stage: matching tensors load, the rest is reported
    ft = run(train_cmd(tiny_config, exp_root, "--name", "ft", "--weights", str(weights), "--datasets", "scannet:1",
                       "model.channels=[8,8,16,16,16,16,8,16]", "train.epochs=1", "train.steps_per_epoch=1"))
    assert ft.returncode == 0, ft.stderr[-3000:]
    text = (exp_root / "ft" / "train.log").read_text()
    assert f"from {weights}" in text and "shape mismatches kept initialised" in text and "unexpected ignored" in text

    weights.write_bytes(weights.read_bytes()[:1000])  # truncated: a crash mid-copy outside our writer
    proc = run(train_cmd(tiny_config, exp_root, "--name", "base", "--resume", "train.epochs=2"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: checkpoint {weights} is corrupt")


def test_datasets_without_the_best_on_dataset_falls_back_with_a_note(synthetic_root, capsys):
    """ppt_joint.yaml keeps the best by scannet; fine-tuned onto --datasets s3dis it must not stop
    on that key: it falls back to the first dataset and says so."""
    sys.path.insert(0, str(REPO / "tools"))
    import train as train_tool

    args = train_tool.parse_args(["--config", str(REPO / "configs" / "ppt_joint.yaml"), "--datasets", "s3dis",
                                  "--data-root", str(synthetic_root), "--plan", "--sizes", "s3dis:4/1"])
    cfg, _ = train_tool.prepare(args)
    assert cfg.train.best_on == "first" and list(cfg.data.mix) == ["s3dis"]
    assert "leaves out scannet" in capsys.readouterr().err
    args = train_tool.parse_args(["--config", str(REPO / "configs" / "ppt_joint.yaml"), "--datasets", "s3dis",
                                  "--plan", "--sizes", "s3dis:4/1", "train.best_on=mean"])
    assert train_tool.prepare(args)[0].train.best_on == "mean"  # the user's choice stands


def test_demo_takes_overrides():
    """`tools/train.sh train.threads=1` is the demo with an override (README's advice), not
    "--config is required"; a mistyped override stops before data is generated or trained."""
    out = subprocess.run(["bash", str(REPO / "tools" / "train.sh"), "optim.lrr=0.1"], cwd=REPO, env=ENV,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "unknown config key 'optim.lrr' (command-line override); did you mean 'optim.lr'?" in out.stderr
    assert "--config is required" not in out.stderr and "generating" not in out.stdout


def test_demo_with_a_valid_override_plans(tmp_path):
    """A valid override passes the demo's up-front check and reaches the run (here --plan, in a
    copy of the checkout so the demo data is made under tmp_path)."""
    for folder in ("tools", "configs"):
        (tmp_path / folder).symlink_to(REPO / folder)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "python3").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (tmp_path / "bin" / "python3").chmod(0o755)
    env = {**ENV, "PATH": f"{tmp_path / 'bin'}:{ENV['PATH']}"}
    out = subprocess.run(["bash", "tools/train.sh", "--plan", "train.threads=1"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr
    assert "plan for configs/demo.yaml" in out.stdout and "steps: 42 per epoch x 6 epochs" in out.stdout
