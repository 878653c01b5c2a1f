"""A Pointcept config's training recipe in this project's terms (``optim``, ``train``, ``data``).

A converted model's ``config.yaml`` fine-tunes with the reference's recipe where it maps:
optimiser, OneCycle schedule, loss, the ``block`` parameter group's lr scale, epochs and
evaluation interval, batch size, gradient clipping, Mix3D and AMP. :func:`training_recipe`
returns the overrides and, for ``convert.json``, what was set from which reference key and
what has no counterpart here (``not_mapped``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# What of a reference config's training recipe this project's config can hold, and what not.
# Reference defaults where a key is absent: torch's own (Pointcept passes the dicts through).
SGD_DEFAULTS = {"momentum": 0.0, "nesterov": False, "weight_decay": 0.0}       # torch.optim.SGD
ADAMW_DEFAULTS = {"betas": (0.9, 0.999), "weight_decay": 0.01}                 # torch.optim.AdamW
ONECYCLE_DEFAULTS = {"pct_start": 0.3, "div_factor": 25.0, "final_div_factor": 1e4, "anneal_strategy": "cos",
                     "cycle_momentum": True, "base_momentum": 0.85, "max_momentum": 0.95, "three_phase": False}
OPTIMIZERS = {"SGD": ("sgd", ("momentum", "nesterov", "weight_decay")),
              "AdamW": ("adamw", ("betas", "weight_decay"))}
LOSSES = {("CrossEntropyLoss",): "ce", ("CrossEntropyLoss", "LovaszLoss"): "ce+lovasz"}
BLOCK_KEYWORD = "block"  # the PTv3 recipe's param_dicts keyword = this project's block group
RECIPE_KEYS = ("optimizer", "scheduler", "param_dicts", "epoch", "batch_size")


@dataclass
class Recipe:
    """A reference config's training recipe in this project's terms.

    Attributes:
        sections: ``{"optim": {...}, "train": {...}, "data": {...}}``: this project's config keys.
        mapped: one ``{"key", "value", "from"}`` per key set (``from``: the reference key).
        not_mapped: one line per reference setting with no counterpart here (what, and why).
    """

    sections: dict = field(default_factory=lambda: {"optim": {}, "train": {}, "data": {}})
    mapped: list = field(default_factory=list)
    not_mapped: list = field(default_factory=list)

    def put(self, key: str, value: Any, source: str) -> None:
        section, name = key.split(".")
        self.sections[section][name] = value
        self.mapped = [m for m in self.mapped if m["key"] != key] + [{"key": key, "value": value, "from": source}]

    def lines(self) -> list[str]:
        """``optim.lr = 0.006  (scheduler.max_lr[0])``, one per mapped key."""
        return [f"{m['key']} = {m['value']}  ({m['from']})" for m in self.mapped]


def _plain_value(value: Any) -> Any:
    return [_plain_value(v) for v in value] if isinstance(value, (list, tuple)) else value


def training_recipe(ref: dict, prompts: bool = False, adaptive: bool = False) -> Recipe:
    """The optimiser, schedule, loss, parameter groups, epochs and batch of a reference config
    (``load_pointcept_config``'s dict) as this project's ``optim`` / ``train`` / ``data`` keys.

    Args:
        ref: the evaluated reference config (``model.criteria`` is read from its ``model``).
        prompts: the converted model has prompt parameters (``optim.prompt_lr_scale`` applies).
        adaptive: they include PDNorm modulations inside the blocks.

    Maps ``optimizer`` (SGD / AdamW: lr, momentum, nesterov, betas, weight decay; torch's
    defaults where a key is absent), ``scheduler`` (OneCycleLR: peak lr = ``max_lr[0]``,
    pct_start, div factors, momentum cycling), ``param_dicts`` keyword "block" ->
    ``optim.block_lr_scale`` (its peak / the base peak), ``model.criteria`` (CE, CE + Lovasz
    at equal weights) -> ``train.loss``, ``epoch`` -> ``train.epochs`` and ``epoch / eval_epoch``
    -> ``train.eval_every`` (the reference evaluates ``eval_epoch`` times), ``batch_size`` (total
    over the GPUs, as ``data.batch_size``), ``clip_grad``, ``mix_prob``, ``enable_amp``,
    ``sync_bn``. Everything else of the recipe is listed in ``not_mapped``.
    """
    r = Recipe()
    skip = r.not_mapped.append
    if not any(k in ref for k in RECIPE_KEYS):
        skip("the config holds no training recipe (optimizer, scheduler, param_dicts, epoch, batch_size): "
             "this project's defaults are kept; give the reference's config file to carry its recipe over")
    base = _optimizer(ref, r)
    peaks = _scheduler(ref, r, base)
    base = r.sections["optim"].get("lr", base)
    _param_groups(ref, r, base, peaks, prompts, adaptive)
    _criteria(ref, r)
    if "epoch" in ref:
        epochs = int(ref["epoch"])
        r.put("train.epochs", epochs, "epoch")
        evals = int(ref.get("eval_epoch") or epochs)
        if 0 < evals <= epochs and epochs % evals == 0:
            r.put("train.eval_every", epochs // evals, f"epoch / eval_epoch = {epochs} / {evals}: "
                                                       f"the reference evaluates {evals} times")
        else:
            skip(f"eval_epoch = {ref.get('eval_epoch')!r}: does not divide epoch {epochs}; train.eval_every kept")
    simple = (("batch_size", "data.batch_size", int, "total over all GPUs, as data.batch_size"),
              ("mix_prob", "data.mix3d_prob", float, ""), ("enable_amp", "train.amp", bool, ""),
              ("sync_bn", "train.sync_bn", bool, ""))
    for source, key, kind, why in simple:
        if source in ref and ref[source] is not None:
            r.put(key, kind(ref[source]), source + (f": {why}" if why else ""))
    if "clip_grad" in ref:
        off = ref["clip_grad"] is None
        r.put("optim.grad_clip", 0.0 if off else float(ref["clip_grad"]), "clip_grad" + (" = None: off" if off else ""))
    if int(ref.get("gradient_accumulation_steps") or 1) != 1:
        skip(f"gradient_accumulation_steps = {ref['gradient_accumulation_steps']}: this project steps every batch")
    _data_train(ref, r)
    return r


def _optimizer(ref: dict, r: Recipe) -> float | None:
    """``optimizer`` -> ``optim.name``, ``optim.lr`` and the optimiser's own keys; the lr."""
    opt = ref.get("optimizer")
    if not isinstance(opt, dict):
        if any(k in ref for k in RECIPE_KEYS):
            r.not_mapped.append("optimizer: not in the config; optim.name / lr / weight_decay keep this project's "
                                "defaults")
        return None
    kind = opt.get("type")
    if kind not in OPTIMIZERS:
        r.not_mapped.append(f"optimizer.type = {kind!r}: this project has {' and '.join(OPTIMIZERS)} (optim.name); "
                            f"optim.* keeps its defaults")
        return None
    name, keys = OPTIMIZERS[kind]
    defaults = SGD_DEFAULTS if name == "sgd" else ADAMW_DEFAULTS
    r.put("optim.name", name, "optimizer.type")
    lr = float(opt["lr"]) if "lr" in opt else None
    if lr is not None:
        r.put("optim.lr", lr, "optimizer.lr")
    for key in keys:
        value = opt.get(key, defaults[key])
        r.put(f"optim.{key}", _plain_value(value), f"optimizer.{key}" + ("" if key in opt else ": torch's default"))
    for key, value in opt.items():
        if key not in (*keys, "type", "lr"):
            r.not_mapped.append(f"optimizer.{key} = {value!r}: no counterpart in optim.*")
    return lr


def _scheduler(ref: dict, r: Recipe, base: float | None) -> list:
    """``scheduler`` (OneCycleLR) -> ``optim.scheduler`` and its keys; the peak lr of each group."""
    sch = ref.get("scheduler")
    if not isinstance(sch, dict):
        if any(k in ref for k in RECIPE_KEYS):
            r.not_mapped.append("scheduler: not in the config; optim.scheduler keeps this project's default")
        return []
    if sch.get("type") != "OneCycleLR":
        r.not_mapped.append(f"scheduler.type = {sch.get('type')!r}: this project's schedules are onecycle "
                            f"(OneCycleLR) and cosine (linear warm-up, then cosine); optim.scheduler kept")
        return []
    full = {**ONECYCLE_DEFAULTS, **sch}
    r.put("optim.scheduler", "onecycle", "scheduler.type = OneCycleLR")
    max_lr = sch.get("max_lr")
    peaks = list(max_lr) if isinstance(max_lr, (list, tuple)) else [max_lr]
    if peaks and peaks[0] is not None:
        where = "scheduler.max_lr[0]" if isinstance(max_lr, (list, tuple)) else "scheduler.max_lr"
        r.put("optim.lr", float(peaks[0]), f"{where}: OneCycleLR's peak")
    for key in ("pct_start", "div_factor", "final_div_factor", "base_momentum", "max_momentum"):
        r.put(f"optim.{key}", float(full[key]), f"scheduler.{key}" + ("" if key in sch else ": torch's default"))
    r.put("optim.cycle_momentum", bool(full["cycle_momentum"]),
          "scheduler.cycle_momentum" + ("" if "cycle_momentum" in sch else ": torch's default"))
    if full["anneal_strategy"] != "cos":
        r.not_mapped.append(f"scheduler.anneal_strategy = {full['anneal_strategy']!r}: this project's OneCycle "
                            f"anneals by cosine")
    if full["three_phase"]:
        r.not_mapped.append("scheduler.three_phase = True: this project's OneCycle has two phases")
    for key, value in sch.items():
        if key not in (*ONECYCLE_DEFAULTS, "type", "max_lr"):
            r.not_mapped.append(f"scheduler.{key} = {value!r}: no counterpart in optim.*")
    return peaks


def _param_groups(ref: dict, r: Recipe, base: float | None, peaks: list, prompts: bool, adaptive: bool) -> None:
    """``param_dicts``: keyword "block" -> ``optim.block_lr_scale``; the prompts' scale."""
    groups = ref.get("param_dicts") or []
    unmapped = []
    for i, group in enumerate(groups):
        keyword = group.get("keyword")
        if len(peaks) == 1 and peaks[0] is not None:  # a scalar max_lr: OneCycleLR gives every group that peak
            peak, scale = peaks[0], 1.0
            why = f"lr {group.get('lr')} replaced by OneCycleLR's scalar max_lr {peaks[0]}"
        else:
            peak = peaks[i + 1] if len(peaks) > i + 1 and peaks[i + 1] is not None else group.get("lr")
            scale = group.get("lr_scale")
            why = f"lr_scale {scale}" if scale is not None else f"peak lr {peak} / {base}"
        if scale is None and peak is not None and base:
            scale = float(peak) / base
        if keyword == BLOCK_KEYWORD and scale is not None:
            r.put("optim.block_lr_scale", round(float(scale), 12), f"param_dicts[{i}] keyword 'block': {why}")
        else:
            unmapped.append(f"{keyword!r}" + (f" (lr {peak:g})" if isinstance(peak, (int, float)) else ""))
    if unmapped:
        shown = ", ".join(unmapped[:3]) + (f", ... ({len(unmapped)} groups)" if len(unmapped) > 3 else "")
        r.not_mapped.append(f"param_dicts keyword {shown}: this project's parameter groups are the prompts "
                            f"(optim.prompt_lr_scale) and the backbone blocks (keyword 'block', "
                            f"optim.block_lr_scale); these train at the base lr")
    if prompts and "optim.name" in {m["key"] for m in r.mapped} and not unmapped:
        r.put("optim.prompt_lr_scale", 1.0, "no param_dicts group for the prompts: the reference trains them at lr")
        if adaptive and r.sections["optim"].get("block_lr_scale", 1.0) != 1.0:
            r.not_mapped.append("PDNorm modulations inside the blocks: the reference's keyword 'block' trains them at "
                                "the block lr; here they are prompt parameters (optim.prompt_lr_scale)")


def _criteria(ref: dict, r: Recipe) -> None:
    """``model.criteria`` -> ``train.loss`` (CE, or CE + Lovasz, each at weight 1)."""
    criteria = (ref.get("model") or {}).get("criteria")
    if criteria is None:
        r.not_mapped.append("model.criteria: not in the config; train.loss keeps this project's default")
        return
    kinds = tuple(sorted(str(c.get("type")) for c in criteria))
    plain = all(float(c.get("loss_weight", 1.0)) == 1.0 and c.get("weight") is None
                and not c.get("label_smoothing") and c.get("mode", "multiclass") == "multiclass" for c in criteria)
    if kinds in LOSSES and plain:
        r.put("train.loss", LOSSES[kinds], "model.criteria = " + " + ".join(kinds))
    elif criteria:
        r.not_mapped.append(f"model.criteria = {list(criteria)!r}: this project's losses are "
                            f"{', '.join(LOSSES.values())} (equal weights, no class weights); train.loss keeps its "
                            f"default")


def _data_train(ref: dict, r: Recipe) -> None:
    """What of ``data.train`` is not read: the augmentation list and per-dataset loops."""
    train = (ref.get("data") or {}).get("train")
    if not isinstance(train, dict):
        return
    parts = train.get("datasets") if train.get("type") == "ConcatDataset" else [train]
    loops = [f"{p.get('type')} x{p['loop']}" for p in parts or [] if isinstance(p, dict) and p.get("loop", 1) != 1]
    if loops:
        r.not_mapped.append(f"data.train loops ({', '.join(loops)}): this project mixes datasets per batch "
                            f"(data.mix ratios, each 1 here) and repeats the first one by data.loop")
    if any(isinstance(p, dict) and p.get("transform") for p in parts or []):
        r.not_mapped.append("data.train transform list: not read; this project's training pipeline is fixed "
                            "(switches data.augment, data.elastic, data.color_drop, data.crop_points)")
