"""CPU threads and loader workers from the free cores (issue 18: the demo on a busy machine)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
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


def test_busy_cores_is_the_busy_share_of_proc_stat(monkeypatch):
    """busy_cores = busy jiffies / all jiffies between two /proc/stat readings x CPUs (bug
    caught: a constant, or the share of the whole uptime instead of the window)."""
    readings = iter([(1000, 4000), (1150, 4200)])  # 150 of 200 jiffies busy in the window
    monkeypatch.setattr(threads_mod, "_cpu_times", lambda: next(readings))
    monkeypatch.setattr(threads_mod.time, "sleep", lambda s: None)
    monkeypatch.setattr(threads_mod.os, "cpu_count", lambda: 4)
    assert threads_mod.busy_cores() == pytest.approx(3.0)


def _spin() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def _spin_detached() -> int:
    """A spinning process that is not our descendant (its shell parent exits at once); its pid."""
    out = subprocess.run(["sh", "-c", f"'{sys.executable}' -c 'while True: pass' >/dev/null 2>&1 & echo $!"],
                         capture_output=True, text=True, check=True)
    return int(out.stdout)


def _kill(proc) -> None:
    if isinstance(proc, int):
        os.kill(proc, signal.SIGKILL)
    else:
        proc.kill()
        proc.wait()


def _with_spinner(measure, start=None) -> float:
    proc = start() if start else None
    try:
        time.sleep(0.3 if start else 0.0)  # let it start
        return measure()
    finally:
        if proc is not None:
            _kill(proc)


needs_proc = pytest.mark.skipif(not Path("/proc/stat").exists(), reason="no /proc/stat")


@needs_proc
def test_busy_cores_sees_a_busy_process():
    """One spinning process adds about one busy core to the /proc/stat measurement: measured
    with and without it, the difference counts, not the level (bug caught: a measurement that
    returns a constant; the machine's other work is in both readings). Retried, since other
    jobs come and go; skipped when other work already fills every core."""
    cores = os.cpu_count() or 1
    for _ in range(3):
        idle = _with_spinner(lambda: threads_mod.busy_cores(sample_s=0.5))
        busy = _with_spinner(lambda: threads_mod.busy_cores(sample_s=0.5), _spin)
        if idle > cores - 1:
            continue  # no free core to see it on
        if busy - idle >= 0.6:
            return
    if idle > cores - 1:
        pytest.skip(f"other work keeps {idle:.1f} of {cores} cores busy")
    pytest.fail(f"a spinning process added {busy - idle:.2f} busy cores ({idle:.2f} -> {busy:.2f})")


@needs_proc
def test_others_busy_leaves_out_our_own_processes():
    """During the run the process is busy itself: others_busy subtracts the CPU time of this
    process and its descendants (loader workers) from the machine's. A spinning child of ours
    is ours, a spinning process elsewhere is someone else's (bugs caught: nothing subtracted,
    so the run would see its own loader worker as load; descendants not counted)."""
    me = os.getpid()

    def measure() -> float:
        before = threads_mod.cpu_sample(me)
        time.sleep(1.0)
        return threads_mod.others_busy(before, threads_mod.cpu_sample(me))

    cores = os.cpu_count() or 1
    for _ in range(3):
        idle = _with_spinner(measure)
        child = _with_spinner(measure, _spin)
        other = _with_spinner(measure, _spin_detached)
        if idle > cores - 1:
            continue
        if child - idle <= 0.4 and other - idle >= 0.6:
            return
    if idle > cores - 1:
        pytest.skip(f"other work keeps {idle:.1f} of {cores} cores busy")
    pytest.fail(f"others busy: {idle:.2f} alone, {child:.2f} beside our spinning child, "
                f"{other:.2f} beside another process's")


class RecordingLogger:
    def __init__(self):
        self.lines, self.scalars_seen = [], []

    def info(self, msg):
        self.lines.append(msg)

    def scalars(self, values, step):
        self.scalars_seen.append((step, values))


def test_follower_drops_threads_at_once_and_raises_them_after_two_checks(monkeypatch):
    """train.threads -1: a job that starts takes a thread away at the next check; when it ends
    the thread comes back once two checks agree (a job that comes and goes does not flip the
    count every check). Each change is a train.log line and a TensorBoard scalar."""
    busy = iter([1.0, 0.0, 1.0, 0.0, 0.0, 0.0])
    monkeypatch.setattr(threads_mod, "busy_cores", lambda: 0.0)
    monkeypatch.setattr(threads_mod, "usable_cores", lambda: 2)
    monkeypatch.setattr(threads_mod, "others_busy", lambda before, after: next(busy))
    follower = threads_mod.ThreadFollower(-1, interval_s=0.0)
    assert follower.threads == torch.get_num_threads() == 2
    assert "train.threads -1 = auto, re-checked every 5 s: 2 cores, 0.0 busy" in follower.note
    log = RecordingLogger()
    seen = []
    for step in range(1, 7):
        follower.recheck(log, step)
        seen.append(torch.get_num_threads())
    assert seen == [1, 1, 1, 1, 2, 2]
    assert log.lines == ["step 1: 2 -> 1 torch thread(s) (train.threads -1: 2 cores, 1.0 busy with other work)",
                         "step 5: 1 -> 2 torch thread(s) (train.threads -1: 2 cores, 0.0 busy with other work)"]
    assert [(s, v["train/torch_threads"]) for s, v in log.scalars_seen] == [(1, 2), (1, 1), (5, 2)]


@pytest.mark.parametrize("requested", [0, 2])
def test_follower_keeps_a_fixed_count(monkeypatch, requested):
    """train.threads N and 0 stay as chosen at start-up (reproducible results): no re-check."""
    monkeypatch.setattr(threads_mod, "busy_cores", lambda: 0.0)
    monkeypatch.setattr(threads_mod, "usable_cores", lambda: 2)
    monkeypatch.setattr(threads_mod, "others_busy", lambda before, after: 2.0)
    follower = threads_mod.ThreadFollower(requested, interval_s=0.0)
    assert not any(follower.recheck(RecordingLogger(), step) for step in range(3))
    assert torch.get_num_threads() == 2


def test_follower_waits_the_interval(monkeypatch):
    monkeypatch.setattr(threads_mod, "busy_cores", lambda: 0.0)
    monkeypatch.setattr(threads_mod, "usable_cores", lambda: 2)
    monkeypatch.setattr(threads_mod, "others_busy", lambda before, after: 2.0)
    follower = threads_mod.ThreadFollower(-1, interval_s=60.0)
    assert not follower.recheck(None, 1) and torch.get_num_threads() == 2


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


def test_trainer_rechecks_threads_between_steps(synthetic_root, tmp_path, monkeypatch):
    """train.threads -1: the trainer re-checks after each step; a job that starts after the run
    (mocked: the free-core reading goes from 0 to 1 busy core) takes a thread away at the next
    step, logged (bug caught: the trainer never calling the re-check)."""
    from ppt.config import load_config
    from ppt.engine.trainer import train

    monkeypatch.setattr(threads_mod, "busy_cores", lambda: 0.0)
    monkeypatch.setattr(threads_mod, "usable_cores", lambda: 2)
    monkeypatch.setattr(threads_mod, "others_busy", lambda before, after: 1.0)
    monkeypatch.setattr(threads_mod, "RECHECK_S", 0.0)
    cfg = load_config(None, [f"data.root={synthetic_root}", "data.mix={scannet: 1}", "data.batch_size=2",
                             "model.channels=[8,8,16,16,16,16,8,8]", "model.layers=[1,1,1,1,1,1,1,1]",
                             "model.head=decoupled", "data.voxel_size=0.1", "data.num_workers=0",
                             "data.mix3d_prob=0.0", "data.check=false", "train.device=cpu", "train.threads=-1",
                             "train.eval_every=0", "train.epochs=1", "train.steps_per_epoch=2",
                             "model.prompt=none"])
    train(cfg, tmp_path / "exp")
    assert torch.get_num_threads() == 1
    log = (tmp_path / "exp" / "train.log").read_text()
    assert "2 torch thread(s) (train.threads -1 = auto, re-checked every 0 s: 2 cores, 0.0 busy" in log
    assert "step 1: 2 -> 1 torch thread(s) (train.threads -1: 2 cores, 1.0 busy with other work)" in log


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
