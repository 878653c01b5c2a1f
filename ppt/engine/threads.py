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
"""
from __future__ import annotations

import os
import time

SAMPLE_S = 0.25  # /proc/stat window: long enough to see a busy core, short enough for start-up


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
        requested: ``train.threads``; > 0 is taken as is, 0 = auto.
        local_processes: training processes on this machine (torchrun's LOCAL_WORLD_SIZE).
        busy: cores busy with other work (default: measured by :func:`busy_cores`).
        cores: usable cores (default: :func:`usable_cores`).
        workers: loader worker processes per training process (:func:`loader_workers`).

    Returns:
        (threads >= 1, reason), e.g. ``(1, "1 torch thread: 2 cores, 1.0 busy with other work")``.
    """
    if requested > 0:
        return requested, f"{requested} torch thread(s) (train.threads)"
    cores = usable_cores() if cores is None else cores
    busy = busy_cores() if busy is None else busy
    procs = max(1, local_processes)
    free = max(1, cores - int(round(min(busy, cores))) - workers * procs)
    threads = max(1, free // procs)
    share = f", {local_processes} training processes" if local_processes > 1 else ""
    loaders = f", {workers * procs} loader worker(s)" if workers else ""
    return threads, (f"{threads} torch thread(s) (train.threads 0 = auto: {cores} cores, {busy:.1f} busy "
                     f"with other work{loaders}{share})")


def loader_workers(requested: int, local_processes: int = 1, cores: int | None = None) -> int:
    """Loader worker processes per training process: ``requested``, capped at the cores left
    after one per training process (DataLoader warns beyond the core count, and a worker
    without a core of its own only slows the step it should hide behind; 0 = load in the
    training process)."""
    cores = usable_cores() if cores is None else cores
    spare = max(0, cores // max(1, local_processes) - 1)
    return max(0, min(requested, spare))
