"""What a run will cost before it starts: ``tools/train.py --plan``.

Steps per epoch follow the training loader's epoch rule (``ppt.data.mixing``: one pass over the
first dataset of the mix, the others cycled); with ``data.loop`` > 1 the first dataset's samples
are its scenes repeated that many times, and the plan says so under the table (``samples 48``
= 24 scenes x loop 2). The evaluation line counts the validation scenes a
run will forward, next to the training samples it draws, so a user sees the share of the
budget that evaluation takes before spending GPU hours on it.
"""
from __future__ import annotations

from ppt.config import Config
from ppt.data.mixing import MultiDatasetLoader


class _Sized:
    """A stand-in dataset of ``n`` samples (planning from published split sizes, no data)."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n


def parse_sizes(text: str) -> dict[str, tuple[int, int | None]]:
    """"structured3d:18000,scannet:1201/312" -> {name: (train scenes, val scenes or None)}."""
    sizes = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, _, counts = item.partition(":")
        train, _, val = counts.partition("/")
        if not train.isdigit() or (val and not val.isdigit()):
            raise ValueError(f"--sizes: {item!r} must look like name:TRAIN or name:TRAIN/VAL (scene counts)")
        sizes[name] = (int(train), int(val) if val else None)
    return sizes


def make_plan(cfg: Config, world_size: int = 1,
              sizes: dict[str, tuple[int, int | None]] | None = None) -> dict:
    """Steps, passes and evaluation volume of ``cfg`` on ``world_size`` processes.

    Args:
        cfg: validated config.
        world_size: training processes (GPUs x machines).
        sizes: scene counts per dataset instead of reading ``cfg.data.root``.

    Returns:
        dict with "main" (the first dataset), "loop" (``data.loop``: its samples are its scenes
        repeated this many times), "datasets" (per dataset: samples, ratio, batches per pass /
        per epoch, passes per epoch), "efficiency" (lines: scenes kept, labelled points; empty without
        ``data.label_budget`` / ``data.scene_fraction``), "steps_per_epoch", "total_steps", "batch_per_rank", "evaluation"
        (val scenes per dataset, evaluations, scene forwards) and "samples_per_epoch".
    """
    from ppt.engine.build import build_val_datasets, per_rank_batch_size

    d = cfg.data
    main = next(iter(d.mix))
    if sizes is not None:
        missing = [n for n in {*d.mix, *(d.val or d.mix)} if n not in sizes]
        if missing:
            raise ValueError(f"--sizes has no count for {', '.join(sorted(missing))}")
        from ppt.data.efficiency import scene_count

        kept = {n: scene_count(sizes[n][0], d.scene_fraction) for n in d.mix}
        train = {n: _Sized(kept[n] * (d.loop if n == main else 1)) for n in d.mix}
        val = {n: sizes[n][1] for n in (d.val or d.mix)}
        efficiency = [f"{n}: {kept[n]} of {sizes[n][0]} training scenes (scene_fraction {d.scene_fraction:g})"
                      + (f"; label budget {d.label_budget} points per scene: at most {kept[n] * d.label_budget:,} "
                         f"labelled points in all, every other label ignored" if d.label_budget else "")
                      for n in d.mix]
    else:
        from ppt.data.datasets import build_dataset
        from ppt.engine.build import data_selection

        train = {n: build_dataset(n, d.root, "train", loop=d.loop if n == main else 1, described=cfg.datasets) for n in d.mix}
        selection = data_selection(cfg, train)  # the scenes and labels the run will draw
        efficiency = selection.summary() if selection is not None else []
        val = {n: len(ds) for n, ds in build_val_datasets(cfg).items()}
    batch = per_rank_batch_size(d, world_size)
    loader = MultiDatasetLoader(train, dict(d.mix), batch, world_size=world_size, mix3d_prob=0.0)
    steps = len(loader)
    if cfg.train.steps_per_epoch > 0:
        steps = min(steps, cfg.train.steps_per_epoch)
    t = cfg.train
    evaluations = 0 if t.eval_every <= 0 else t.epochs // t.eval_every + (t.epochs % t.eval_every != 0)
    return {
        "main": main, "loop": d.loop, "world_size": world_size, "batch_per_rank": batch, "batch": d.batch_size,
        "datasets": loader.epoch_summary(), "steps_per_epoch": steps, "epochs": t.epochs,
        "total_steps": steps * t.epochs, "samples_per_epoch": steps * d.batch_size,
        "evaluation": {"every": t.eval_every, "evaluations": evaluations, "val_scenes": val,
                       "scene_forwards": evaluations * sum(v or 0 for v in val.values())},
        "precise_bn_batches": t.precise_bn * len(d.mix) * (evaluations or 1),
        "efficiency": efficiency if d.label_budget or d.scene_fraction < 1.0 else [],
    }


def format_plan(plan: dict) -> str:
    """The plan as the lines ``--plan`` prints."""
    lines = [f"{plan['world_size']} process(es) x {plan['batch_per_rank']} samples = batch {plan['batch']}; "
             f"the epoch is one pass over {plan['main']} (the first dataset of the mix)",
             f"{'dataset':<14}{'ratio':>6}{'samples':>10}{'batches/pass':>14}{'batches/epoch':>15}"
             f"{'passes/epoch':>14}"]
    for name, s in plan["datasets"].items():
        lines.append(f"{name:<14}{s['ratio']:>6}{s['samples']:>10}{s['batches_per_pass']:>14}"
                     f"{s['batches_per_epoch']:>15}{s['passes_per_epoch']:>14.2f}")
    loop = plan.get("loop", 1)
    if loop > 1:
        samples = plan["datasets"][plan["main"]]["samples"]
        lines.append(f"{plan['main']}: {samples} samples = {samples // loop} training scenes x data.loop {loop} "
                     f"(its scene list repeated {loop} times per epoch; the other datasets are cycled)")
    lines.append(f"steps: {plan['steps_per_epoch']:,} per epoch x {plan['epochs']} epochs = "
                 f"{plan['total_steps']:,} ({plan['samples_per_epoch']:,} training samples per epoch)")
    e = plan["evaluation"]
    if e["evaluations"]:
        scenes = ", ".join(f"{n} {v if v is not None else '?'}" for n, v in e["val_scenes"].items())
        share = e["scene_forwards"] / max(plan["samples_per_epoch"] * plan["epochs"], 1)
        lines.append(f"evaluation: every {e['every']} epoch(s) -> {e['evaluations']} evaluations of "
                     f"{scenes} val scenes = {e['scene_forwards']:,} whole-scene forwards "
                     f"({share:.1%} of the training samples drawn; forward only)")
    else:
        lines.append("evaluation: off (train.eval_every 0)")
    for line in plan.get("efficiency", []):
        lines.append(f"data efficiency: {line}")
    if plan["precise_bn_batches"]:
        lines.append(f"precise BN: {plan['precise_bn_batches']:,} extra forward batches in all")
    return "\n".join(lines)
