"""How many torch CPU threads a process should use, from the cores that are free right now.

torch's intra-op pool is OpenMP: a parallel region ends when its slowest thread does. When one
of those threads shares its core with another busy process, every region waits for it, and the
waiting threads spin on their cores (OpenMP's default wait policy), stealing time from the
process they wait for. On a 2-core machine beside one busy job that made a demo step 3-30x
slower (issue 18); one thread per FREE core keeps the slow-down in proportion to the load.

``train.threads: 0`` (auto) therefore takes the cores this process may run on, subtracts what
other processes keep busy (sampled from ``/proc/stat`` over a short window, else the 1-minute
load average) and the training processes' own loader workers (they run beside the step, and an
OpenMP thread sharing a core with one stalls as with any other process), and divides the rest
between the training processes of this machine. Measured on 2 cores with the demo's one loader
worker (bench/RESULTS.md §9): 1 thread 36-37 s for 2 epochs, 2 threads 38-47 s, idle or not.
The choice is made once, at start-up, and logged.

``train.threads: -1`` (follow) makes the same choice at start-up and re-makes it between steps
every :data:`RECHECK_S` seconds (:class:`ThreadFollower`), so a job that starts after the run
(a test suite, a second run) no longer stalls it: the busy share of the interval since the last
check, from ``/proc/stat``, minus what this run's own processes used (``/proc/<pid>/stat`` of
this process and its descendants, loader workers included; under torchrun of the launcher's
tree). No sleep, no extra thread: one pass over ``/proc`` (~1-10 ms for 100 processes) per
check. Fewer threads take effect at the first check that sees the load; more threads only when
two checks in a row agree, so a job that comes and goes does not flip the count every check.

Why it is opt-in: the thread count changes results on CPU. torch's CPU BatchNorm (training
mode) splits its reduction over points between the threads, so 1 and 2 threads give batch
statistics that differ in the last bits (2e-5 after the stem of the demo model, torch 2.14),
and training amplifies that (weights 2e-6 apart after one demo step, 0.4 after twelve). A fixed
count (N, or 0's start-up choice, logged) reproduces a run bit for bit; -1 makes the result
depend on what else ran on the machine.
"""
from __future__ import annotations

import os
import time

SAMPLE_S = 0.25  # /proc/stat window: long enough to see a busy core, short enough for start-up
RECHECK_S = 5.0  # train.threads -1: seconds between re-checks (made between steps)
FOLLOW = -1      # train.threads value that re-checks during the run


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask; os.cpu_count() where there is none)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _cpu_times() -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs from /proc/stat, or None off Linux."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already inside user/nice
    return total - idle, total


def busy_cores(sample_s: float = SAMPLE_S) -> float:
    """Cores kept busy by the machine's other processes now (0 where it cannot be read).

    Samples /proc/stat twice ``sample_s`` apart (this process sleeps meanwhile, so what is
    busy is someone else); falls back to the 1-minute load average, which lags a minute.
    """
    first = _cpu_times()
    if first is not None:
        time.sleep(sample_s)
        second = _cpu_times()
        if second is not None and second[1] > first[1]:
            share = (second[0] - first[0]) / (second[1] - first[1])
            return share * (os.cpu_count() or 1)
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0


def local_processes() -> int:
    """Training processes on this machine (torchrun sets LOCAL_WORLD_SIZE; 1 without it)."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


def choose_threads(requested: int, local_processes: int = 1, busy: float | None = None,
                   cores: int | None = None, workers: int = 0) -> tuple[int, str]:
    """Threads for one training process, and a line saying why.

    Args:
        requested: ``train.threads``; > 0 is taken as is, 0 = auto, -1 = auto (re-checked later
            by :class:`ThreadFollower`; the choice now is the same as 0's).
        local_processes: training processes on this machine (torchrun's LOCAL_WORLD_SIZE).
        busy: cores busy with other work (default: measured by :func:`busy_cores`).
        cores: usable cores (default: :func:`usable_cores`).
        workers: loader worker processes per training process (:func:`loader_workers`).

    Returns:
        (threads >= 1, reason), e.g. ``(1, "1 torch thread(s) (train.threads 0 = auto: 2 cores,
        1.0 busy with other work)")``.
    """
    if requested > 0:
        return requested, f"{requested} torch thread(s) (train.threads)"
    cores = usable_cores() if cores is None else cores
    busy = busy_cores() if busy is None else busy
    threads, why = _free_threads(cores, busy, local_processes, workers)
    mode = "0 = auto" if requested == 0 else f"{FOLLOW} = auto, re-checked every {RECHECK_S:g} s"
    return threads, f"{threads} torch thread(s) (train.threads {mode}: {why})"


def _free_threads(cores: int, busy: float, local_processes: int, workers: int) -> tuple[int, str]:
    """One thread per core left free by other work and the loader workers, shared between the
    training processes; and the reason, e.g. "2 cores, 1.0 busy with other work"."""
    procs = max(1, local_processes)
    free = max(1, cores - int(round(min(busy, cores))) - workers * procs)
    share = f", {local_processes} training processes" if local_processes > 1 else ""
    loaders = f", {workers * procs} loader worker(s)" if workers else ""
    return max(1, free // procs), f"{cores} cores, {busy:.1f} busy with other work{loaders}{share}"


def _tree_jiffies(root: int) -> int | None:
    """CPU time (clock ticks, as /proc/stat) used so far by process ``root`` and its descendants:
    utime + stime + cutime + cstime over the live tree (cutime/cstime hold the children already
    reaped, so the sum only grows as loader workers come and go); None without /proc."""
    parent, used = {}, {}
    try:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return None
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, ...
            parent[pid], used[pid] = int(fields[1]), sum(int(v) for v in fields[11:15])
        except (OSError, IndexError, ValueError):
            continue  # exited meanwhile
    if root not in used:
        return None
    children: dict[int, list[int]] = {}
    for pid, ppid in parent.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += used[pid]
        todo += children.get(pid, [])
    return total


def cpu_sample(root: int) -> tuple[float, tuple[int, int] | None, int | None]:
    """(monotonic seconds, (busy, total) jiffies of the machine, jiffies of our process tree)."""
    return time.monotonic(), _cpu_times(), _tree_jiffies(root)


def others_busy(before: tuple, after: tuple, cpus: int | None = None) -> float | None:
    """Cores other processes kept busy between two :func:`cpu_sample` readings (None if unreadable):
    the machine's busy share minus our process tree's."""
    if None in (before[1], after[1], before[2], after[2]) or after[1][1] <= before[1][1]:
        return None
    ours = after[2] - before[2]
    share = (after[1][0] - before[1][0] - ours) / (after[1][1] - before[1][1])
    return max(0.0, share * (cpus or os.cpu_count() or 1))


class ThreadFollower:
    """torch's CPU thread count for one training process, set at start-up and, with
    ``train.threads: -1``, moved between steps as other jobs start and stop.

    Args:
        requested: ``train.threads`` (N > 0 fixed, 0 = auto at start-up, -1 = auto and re-checked).
        local_processes: training processes on this machine (torchrun's LOCAL_WORLD_SIZE); with
            more than one, the launcher's whole process tree counts as this run's own.
        workers: loader worker processes per training process.
        interval_s: seconds between re-checks (default :data:`RECHECK_S`).

    ``threads`` is the count now, ``note`` the start-up line for train.log. Call
    :meth:`recheck` between steps; it does nothing unless ``requested`` is -1.
    """

    def __init__(self, requested: int, local_processes: int = 1, workers: int = 0,
                 interval_s: float | None = None):
        import torch

        self._set_threads = torch.set_num_threads
        self.follow = requested < 0
        self.threads, self.note = choose_threads(requested, local_processes, workers=workers)
        self._set_threads(self.threads)
        self.local_processes, self.workers = local_processes, workers
        self.interval_s = RECHECK_S if interval_s is None else interval_s
        self._root = os.getppid() if local_processes > 1 else os.getpid()
        self._last = cpu_sample(self._root) if self.follow else None
        self._wanted: int | None = None  # a higher count the previous check asked for
        self._scalar_written = False

    def recheck(self, logger=None, step: int = 0) -> bool:
        """Between steps: once ``interval_s`` has passed since the last check, re-choose the
        thread count from the cores other processes left free since then and set it. A change
        is logged (a train.log line, TensorBoard ``train/torch_threads``). Returns whether the
        count changed."""
        if not self.follow:
            return False
        if logger is not None and not self._scalar_written:
            logger.scalars({"train/torch_threads": self.threads}, step)
            self._scalar_written = True
        if time.monotonic() - self._last[0] < self.interval_s:
            return False
        now = cpu_sample(self._root)
        busy, self._last = others_busy(self._last, now), now
        if busy is None:
            return False
        threads, why = _free_threads(usable_cores(), busy, self.local_processes, self.workers)
        wanted, self._wanted = self._wanted, (threads if threads > self.threads else None)
        if threads > self.threads:  # more threads only when two checks in a row ask for them
            if wanted is None:
                return False
            threads = min(threads, wanted)
        if threads == self.threads:
            return False
        before, self.threads, self._wanted = self.threads, threads, None
        self._set_threads(threads)
        if logger is not None:
            logger.info(f"step {step}: {before} -> {threads} torch thread(s) (train.threads {FOLLOW}: {why})")
            logger.scalars({"train/torch_threads": threads}, step)
        return True


def loader_workers(requested: int, local_processes: int = 1, cores: int | None = None) -> int:
    """Loader worker processes per training process: ``requested``, capped at the cores left
    after one per training process (DataLoader warns beyond the core count, and a worker
    without a core of its own only slows the step it should hide behind; 0 = load in the
    training process)."""
    cores = usable_cores() if cores is None else cores
    spare = max(0, cores // max(1, local_processes) - 1)
    return max(0, min(requested, spare))
