"""The demo on a busy machine: wall time idle and beside busy processes, per thread policy.

    python bench/busy_machine.py [--epochs 2] [--busy 1] [--repeats 2] [--out bench/results/busy_machine.json]

Trains ``configs/demo.yaml`` for ``--epochs`` epochs (with its final evaluation) from the
demo's data (``data/synthetic``, made by ``tools/train.sh``), once on the machine as it is and
once beside ``--busy`` processes that spin a core each (a stand-in for "a laptop or shared
server doing something else"), for each setting:

- ``all cores``: ``train.threads`` = every core (what ``train.threads: 0`` meant before);
- ``all cores, passive wait``: the same with ``OMP_WAIT_POLICY=PASSIVE`` (idle OpenMP threads
  sleep instead of spinning);
- ``auto``: ``train.threads: 0`` as now (``ppt.engine.threads``: one thread per free core).

Each cell is the fastest of ``--repeats`` runs (idle and busy runs interleaved), so a burst of
other work during one run does not set the figure. Prints a markdown table (seconds, and busy /
idle) and writes the JSON with every run and the load average before it. Run it on an otherwise
idle machine: the "idle" rows are the baseline of the ratio.
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
from ppt.engine.threads import usable_cores  # noqa: E402

SPIN = "while True: pass"


SETTINGS = ("all", "passive", "auto")


def settings(cores: int, keep=SETTINGS) -> list[tuple[str, list[str], dict]]:
    every = {"all": ("all cores", [f"train.threads={cores}"], {}),
             "passive": ("all cores, passive wait", [f"train.threads={cores}"], {"OMP_WAIT_POLICY": "PASSIVE"}),
             "auto": ("auto (train.threads 0)", ["train.threads=0"], {})}
    return [every[k] for k in keep]


def run_demo(overrides: list[str], env: dict, epochs: int, data: str, exp_root: str, name: str) -> float:
    """Wall seconds of one demo training run (process start to exit)."""
    cmd = [sys.executable, str(REPO / "tools" / "train.py"), "--config", str(REPO / "configs" / "demo.yaml"),
           "--name", name, "--exp-root", exp_root, f"data.root={data}", f"train.epochs={epochs}",
           "train.eval_every=0", *overrides]
    tic = time.perf_counter()
    out = subprocess.run(cmd, cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True)
    seconds = time.perf_counter() - tic
    if out.returncode != 0:
        raise SystemExit(f"error: demo run failed ({' '.join(overrides)}):\n{out.stderr[-2000:]}")
    return seconds


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--busy", type=int, default=1, help="spinning processes beside the busy runs")
    p.add_argument("--repeats", type=int, default=2, help="runs per cell; the fastest counts")
    p.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated, of {', '.join(SETTINGS)}")
    p.add_argument("--data", default=str(REPO / "data" / "synthetic"))
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "busy_machine.json"))
    args = p.parse_args()
    if not Path(args.data).is_dir():
        print(f"error: no demo data at {args.data} (run tools/train.sh once, or tools/make_synthetic.py)",
              file=sys.stderr)
        return 2
    info = machine_info()
    cores = usable_cores()
    rows = []
    with tempfile.TemporaryDirectory() as exp_root:
        for i, (label, overrides, env) in enumerate(settings(cores, args.settings.split(","))):
            row = {"setting": label, "runs": []}
            for r in range(args.repeats):
                for load in ("idle", "busy"):
                    spinners = [subprocess.Popen([sys.executable, "-c", SPIN])
                                for _ in range(args.busy if load == "busy" else 0)]
                    try:
                        time.sleep(1.0 if spinners else 0.0)  # let them take their cores
                        before = os.getloadavg()[0]
                        seconds = run_demo(overrides, env, args.epochs, args.data, exp_root, f"s{i}_{load}_{r}")
                    finally:
                        for s in spinners:
                            s.kill()
                            s.wait()
                    row["runs"].append({"load": load, "seconds": seconds, "load_avg_before": before})
                    row[load] = min(seconds, row.get(load, seconds))
                    print(f"{label}, {load} #{r + 1}: {seconds:.1f} s (1-min load average before: {before:.2f})",
                          flush=True)
            row["ratio"] = row["busy"] / row["idle"]
            rows.append(row)
    print(f"\n{args.epochs}-epoch demo, {cores} cores, busy = {args.busy} spinning process(es); "
          f"{info['cpu']}, load before {info['load_avg_1min']}")
    print(format_table(rows, ["setting", "idle", "busy", "ratio"], ["setting", "idle s", "busy s", "busy / idle"]))
    save_json({"machine": info, "epochs": args.epochs, "busy": args.busy, "rows": rows}, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
