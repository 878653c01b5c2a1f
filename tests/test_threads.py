"""CPU threads and loader workers from the free cores (issue 18: the demo on a busy machine)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ppt.engine import threads as threads_mod
from ppt.engine.threads import choose_threads, loader_workers

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def keep_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("cores, busy, procs, expected", [
    (2, 0.0, 1, 2),    # idle: every core
    (2, 1.0, 1, 1),    # one busy job beside us: one thread, not two that wait on each other
    (2, 0.6, 1, 1),    # a job that keeps most of a core busy counts as one
    (2, 2.0, 1, 1),    # all busy: still one
    (16, 3.2, 4, 3),   # 13 free cores shared by 4 torchrun processes
    (4, 9.0, 1, 1),    # load above the core count
])
def test_auto_threads_take_the_free_cores(cores, busy, procs, expected):
    threads, why = choose_threads(0, procs, busy=busy, cores=cores)
    assert threads == expected
    assert f"{cores} cores" in why and f"{busy:.1f} busy" in why


@pytest.mark.parametrize("cores, busy, procs, workers, expected", [
    (2, 0.0, 1, 1, 1),    # the demo: its loader worker takes the second core (measured faster)
    (2, 1.0, 1, 1, 1),
    (16, 0.0, 1, 4, 12),  # 4 workers beside one process
    (16, 0.0, 2, 3, 5),   # 2 processes x (1 + 3 workers) of 16 cores
])
def test_auto_threads_leave_the_loader_workers_their_cores(cores, busy, procs, workers, expected):
    """Bug caught: torch threads and our own loader processes on the same cores (OpenMP threads
    spinning on a core a worker needs; the demo's 2 threads + 1 worker ran 38-47 s where one
    thread ran 36-37 s)."""
    threads, why = choose_threads(0, procs, busy=busy, cores=cores, workers=workers)
    assert threads == expected
    assert f"{workers * procs} loader worker(s)" in why


def test_explicit_threads_are_kept():
    assert choose_threads(3, 1, busy=2.0, cores=2)[0] == 3


def test_busy_cores_sees_a_busy_process():
    """A process spinning on a core shows up as about one busy core (/proc/stat sampling)."""
    if not Path("/proc/stat").exists():
        pytest.skip("no /proc/stat")
    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        import time

        time.sleep(0.3)  # let it start
        busy = threads_mod.busy_cores(sample_s=0.5)
    finally:
        spin.kill()
        spin.wait()
    assert busy >= 0.7  # one spinning process is at least ~1 core whatever else runs


@pytest.mark.parametrize("requested, cores, procs, expected", [
    (4, 2, 1, 1),      # the PEFT config's 4 workers on 2 cores: one (torch warned 32 times)
    (4, 1, 1, 0),      # no core to spare: load in the training process
    (4, 64, 8, 4),     # 8 GPUs, 64 cores: as asked
    (12, 64, 8, 7),    # capped at 8 - 1 per process
])
def test_loader_workers_never_exceed_the_spare_cores(requested, cores, procs, expected):
    assert loader_workers(requested, procs, cores=cores) == expected


@pytest.mark.parametrize("busy, why", [(1.0, "2 cores, 1.0 busy"),
                                       (0.0, "2 cores, 0.0 busy with other work, 1 loader worker(s)")])
def test_trainer_uses_the_chosen_threads_and_logs_them(synthetic_root, tmp_path, monkeypatch, busy, why):
    """The trainer calls the policy: with one core busy, or with its one loader worker on the
    second core (bug caught: the trainer not passing its loader workers), it trains on one thread."""
    from ppt.config import load_config
    from ppt.engine.trainer import train

    monkeypatch.setattr(threads_mod, "busy_cores", lambda: busy)
    monkeypatch.setattr(threads_mod, "usable_cores", lambda: 2)
    torch.set_num_threads(2)
    cfg = load_config(None, [f"data.root={synthetic_root}", "data.mix={scannet: 1}", "data.batch_size=2",
                             "model.channels=[8,8,16,16,16,16,8,8]", "model.layers=[1,1,1,1,1,1,1,1]",
                             "model.head=decoupled", "data.voxel_size=0.1", "data.num_workers=4",
                             "data.mix3d_prob=0.0", "data.check=false", "train.device=cpu", "train.threads=0",
                             "train.eval_every=0", "train.epochs=1", "train.steps_per_epoch=1",
                             "model.prompt=none"])
    train(cfg, tmp_path / "exp")
    assert torch.get_num_threads() == 1
    log = (tmp_path / "exp" / "train.log").read_text()
    assert f"1 torch thread(s) (train.threads 0 = auto: {why}" in log


def test_build_caps_loader_workers(synthetic_root, monkeypatch):
    from ppt.config import load_config
    from ppt.engine.build import build_train_loader

    monkeypatch.setattr(threads_mod, "usable_cores", lambda: 2)
    cfg = load_config(None, [f"data.root={synthetic_root}", "data.mix={scannet: 1}", "data.num_workers=4",
                             "data.batch_size=2"])
    assert build_train_loader(cfg, 0, 1).num_workers == 1


def test_package_imports_from_any_folder(tmp_path):
    """README's `ppt.Predictor` snippet runs outside the checkout: the install makes `ppt` importable
    (requirements.txt installs the project itself, editable)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", "import ppt, os; print(os.path.dirname(ppt.__file__))"],
                         cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()) == REPO / "ppt"
