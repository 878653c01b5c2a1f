"""The demo on a busy machine: wall time idle and beside busy processes, per thread policy.

    python bench/busy_machine.py [--epochs 2] [--busy 1] [--repeats 2] [--settings auto,follow]
        [--loads idle,busy,after] [--after-s 5] [--workers N] [--quiet-below 0.3]
        [--out bench/results/busy_machine.json]

Trains ``configs/demo.yaml`` for ``--epochs`` epochs (with its final evaluation) from the
demo's data (``data/synthetic``, made by ``tools/train.sh``) under each load:

- ``idle``: the machine as it is;
- ``busy``: beside ``--busy`` processes that spin a core each from before the start (a stand-in
  for "a laptop or shared server doing something else");
- ``after``: the run starts on the machine as it is and the spinning processes start
  ``--after-s`` seconds after its set-up (its thread choice made, the train.log "started" line
  written), as a test suite or second run started beside it, until it ends;

for each setting:

- ``all``: ``train.threads`` = every core (what ``train.threads: 0`` meant before issue 18);
- ``passive``: the same with ``OMP_WAIT_POLICY=PASSIVE`` (idle OpenMP threads sleep instead of
  spinning);
- ``auto``: ``train.threads: 0`` (``ppt.engine.threads``: one thread per free core, chosen at
  start-up);
- ``follow``: ``train.threads: -1`` (the same choice, re-checked between steps every 5 s).

``--workers N`` sets ``data.num_workers`` (the demo's is 1, which on 2 cores already leaves auto
one thread; 0 lets auto take both cores when idle, the case where a later job matters).

Each cell is the fastest of ``--repeats`` runs (loads interleaved), so a burst of other work
during one run does not set the figure. Beside every run the bench records the 1-minute load
average before it and the cores that work OUTSIDE this bench kept busy during it (``outside``:
/proc/stat minus the CPU time of the bench's own process tree: the run, its loader workers and
the spinners), so a figure taken on a machine that was not quiet shows it. Prints a markdown
table (seconds, ratios to idle, the outside load during each counted run) and writes the JSON with
every run and the thread changes its train.log records. On a shared machine, ``--quiet-below C``
holds each run until other work keeps fewer than C cores busy (5-s /proc/stat windows, at most
``--quiet-wait`` seconds), so the cells are taken in the machine's quiet spells.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import format_table, machine_info, save_json  # noqa: E402
from ppt.engine.threads import cpu_sample, others_busy, usable_cores  # noqa: E402

SPIN = "while True: pass"
SETTINGS = ("all", "passive", "auto", "follow")
LOADS = ("idle", "busy", "after")


def settings(cores: int, keep=SETTINGS) -> list[tuple[str, list[str], dict]]:
    every = {"all": ("all cores", [f"train.threads={cores}"], {}),
             "passive": ("all cores, passive wait", [f"train.threads={cores}"], {"OMP_WAIT_POLICY": "PASSIVE"}),
             "auto": ("auto at start-up (train.threads 0)", ["train.threads=0"], {}),
             "follow": ("auto, re-checked (train.threads -1)", ["train.threads=-1"], {})}
    return [every[k] for k in keep]


def spinners(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(n)]


def wait_quiet(below: float, max_s: float) -> float:
    """Wait until work outside this bench keeps fewer than ``below`` cores busy over 5 s (at
    most ``max_s`` seconds); the last reading."""
    deadline = time.monotonic() + max_s
    while True:
        before = cpu_sample(os.getpid())
        time.sleep(5.0)
        busy = others_busy(before, cpu_sample(os.getpid()))
        if busy is None or busy < below or time.monotonic() > deadline:
            return busy
        print(f"  waiting: {busy:.2f} cores busy outside the bench", flush=True)


def started(log: Path, proc: subprocess.Popen) -> bool:
    """Wait for the run's train.log "started" line (set-up done); False if it exited first."""
    while proc.poll() is None:
        if log.exists() and " started " in log.read_text():
            return True
        time.sleep(0.2)
    return False


def run_demo(overrides: list[str], env: dict, epochs: int, data: str, exp_root: str, name: str,
             busy: int = 0, after_s: float | None = None) -> dict:
    """One demo training run beside ``busy`` spinning processes, started ``after_s`` seconds
    after the run's set-up (None: one second before the run). Returns its wall seconds (process start to
    exit), the cores outside this bench kept busy meanwhile, and the train.log thread lines."""
    cmd = [sys.executable, str(REPO / "tools" / "train.py"), "--config", str(REPO / "configs" / "demo.yaml"),
           "--name", name, "--exp-root", exp_root, f"data.root={data}", f"train.epochs={epochs}",
           "train.eval_every=0", *overrides]
    spin = spinners(busy) if after_s is None else []
    try:
        time.sleep(1.0 if spin else 0.0)  # let them take their cores
        load_before = os.getloadavg()[0]
        before = cpu_sample(os.getpid())
        with tempfile.TemporaryFile() as err:
            tic = time.perf_counter()
            proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=err)
            if after_s is not None and started(Path(exp_root) / name / "train.log", proc):
                try:
                    proc.wait(timeout=after_s)
                except subprocess.TimeoutExpired:
                    spin = spinners(busy)
            code = proc.wait()
            seconds = time.perf_counter() - tic
            err.seek(0)
            stderr = err.read().decode(errors="replace")
    finally:
        for s in spin:
            s.kill()
            s.wait()
    outside = others_busy(before, cpu_sample(os.getpid()))  # the run and spinners are reaped: ours
    if code != 0:
        raise SystemExit(f"error: demo run failed ({' '.join(overrides)}):\n{stderr[-2000:]}")
    log = (Path(exp_root) / name / "train.log").read_text()
    threads = [line.split("] ", 1)[-1] for line in log.splitlines() if "torch thread(s)" in line]
    threads[0] = threads[0][threads[0].rfind("; ") + 2:]  # the start line: its thread part
    return {"seconds": seconds, "outside_cores": outside, "load_avg_before": load_before, "threads": threads}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--busy", type=int, default=1, help="spinning processes beside the busy runs")
    p.add_argument("--repeats", type=int, default=2, help="runs per cell; the fastest counts")
    p.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated, of {', '.join(SETTINGS)}")
    p.add_argument("--loads", default=",".join(LOADS), help=f"comma-separated, of {', '.join(LOADS)}")
    p.add_argument("--after-s", type=float, default=5.0, help="'after' load: seconds after the run's set-up")
    p.add_argument("--workers", type=int, default=None, help="data.num_workers (default: the demo's, 1)")
    p.add_argument("--quiet-below", type=float, default=0.0,
                   help="hold each run until other work keeps fewer cores busy (0 = do not wait)")
    p.add_argument("--quiet-wait", type=float, default=3600.0, help="longest hold per run, seconds")
    p.add_argument("--data", default=str(REPO / "data" / "synthetic"))
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "busy_machine.json"))
    args = p.parse_args()
    if not Path(args.data).is_dir():
        print(f"error: no demo data at {args.data} (run tools/train.sh once, or tools/make_synthetic.py)",
              file=sys.stderr)
        return 2
    loads = args.loads.split(",")
    if any(load not in LOADS for load in loads):
        print(f"error: --loads {args.loads}: valid loads are {', '.join(LOADS)}", file=sys.stderr)
        return 2
    workers = [] if args.workers is None else [f"data.num_workers={args.workers}"]
    info = machine_info()
    cores = usable_cores()
    rows = []
    with tempfile.TemporaryDirectory() as exp_root:
        for i, (label, overrides, env) in enumerate(settings(cores, args.settings.split(","))):
            row = {"setting": label, "runs": []}
            for r in range(args.repeats):
                for load in loads:
                    if args.quiet_below > 0:
                        wait_quiet(args.quiet_below, args.quiet_wait)
                    run = run_demo(overrides + workers, env, args.epochs, args.data, exp_root, f"s{i}_{load}_{r}",
                                   busy=0 if load == "idle" else args.busy,
                                   after_s=args.after_s if load == "after" else None)
                    row["runs"].append({"load": load, **run})
                    if run["seconds"] <= row.get(load, run["seconds"]):  # the fastest counts
                        row[load], row[f"{load}_outside"] = run["seconds"], run["outside_cores"]
                    changes = [t for t in run["threads"] if t.startswith("step ")]
                    outside = "?" if run["outside_cores"] is None else f"{run['outside_cores']:.2f}"
                    print(f"{label}, {load} #{r + 1}: {run['seconds']:.1f} s (outside load {outside} cores; "
                          f"1-min load average before {run['load_avg_before']:.2f}); {run['threads'][0]}"
                          + (f"; then {'; '.join(changes)}" if changes else ""), flush=True)
            for load in ("busy", "after"):
                if load in row and "idle" in row:
                    row[f"{load}_ratio"] = row[load] / row["idle"]
            row["outside"] = " / ".join("?" if row.get(f"{k}_outside") is None else f"{row[f'{k}_outside']:.2f}"
                                        for k in loads)
            rows.append(row)
    print(f"\n{args.epochs}-epoch demo, {cores} cores, busy = {args.busy} spinning process(es) "
          f"(after: from {args.after_s:g} s after set-up), data.num_workers {args.workers if workers else 'as the demo'}; "
          f"{info['cpu']}, load before {info['load_avg_1min']}")
    print(format_table(rows, ["setting", "idle", "busy", "after", "busy_ratio", "after_ratio", "outside"],
                       ["setting", "idle s", "busy from start s", "busy after start s", "busy / idle",
                        "after / idle", f"outside load, cores ({' / '.join(loads)})"]))
    save_json({"machine": info, "epochs": args.epochs, "busy": args.busy, "after_s": args.after_s,
               "workers": args.workers, "rows": rows}, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
