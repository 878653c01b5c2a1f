"""Typed experiment configuration: YAML files validated into dataclasses, ``key=value`` overrides.

A config file is plain YAML with the sections of :class:`Config` (no inheritance, no
registries): every key must exist in its dataclass and keep its type. Mistakes fail early with
one message naming the file, the key and the fix::

    unknown config key 'optim.lrr' in configs/x.yaml; did you mean 'optim.lr'?
    config key 'train.epochs' in configs/x.yaml must be int, got str ('ten')

Command-line overrides use dotted keys; values are parsed with ``yaml.safe_load`` and checked
the same way (``optim.lr=0.01 model.channels=[8,8,16,16,16,16,8,8] data.mix={scannet:1}``).
The resolved config is written next to the run (``exp/<name>/config.yaml``) and stored in
every checkpoint.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ppt.config_checks import LORA_TARGETS, LOSSES, PEFT_STAGES, validate
from ppt.config_ptv3 import PTv3Config
from ppt.data.classes import DatasetInfo
from ppt.data.dataset_file import DatasetSpec, resolve_dataset
from ppt.io import atomic_write
from ppt.typed_config import ConfigError, field_types, from_dict, merge_sections, parse_overrides, plain

__all__ = ["ConfigError", "Config", "load_config", "config_from_dict", "save_config", "validate",
           "LOSSES", "PEFT_STAGES", "LORA_TARGETS"]


@dataclass
class DataConfig:
    """Data root, dataset mix and the per-sample pipeline.

    Args:
        root: data root holding ``<dataset>/`` folders (``data/`` or ``data/synthetic``).
        mix: dataset name -> batch ratio (``{structured3d: 4, scannet: 2, s3dis: 1}``); every
            batch comes from one dataset, datasets take turns by these ratios. The FIRST dataset
            defines the epoch (one pass over it); the others are reshuffled and re-iterated
            whenever they run out (the reference's rule; ``ppt.data.mixing``).
        val: datasets evaluated on their val split; empty = the datasets of ``mix``.
        voxel_size: grid-sampling voxel in metres.
        batch_size: samples per step summed over all processes (split evenly across them).
        num_workers: loader worker processes per training process, capped at the cores left
            after one per training process (``ppt.engine.threads.loader_workers``).
        mix3d_prob: probability of merging each pair of samples (Mix3D).
        augment: apply the training augmentations (SPEC §2).
        elastic: include elastic distortion in them (the reference does). An ablation switch:
            off was not better in short single-domain runs over 3 seeds (ScanNet-like alone,
            497 demo steps: 41.0 +- 3.3 vs 39.8 +- 0.9 mIoU; bench/RESULTS.md §7).
        color_drop: probability of dropping a training sample's whole colour (set to 0, as
            Pointcept's ``RandomDropColor``; the Sonata recipe uses 0.2). 0 = off. A model
            trained with it labels clouds without colour (``tools/infer.py`` fills in the same
            0); one trained without refuses them.
        crop_points: dataset name -> most points a training sample keeps after grid sampling
            (a sphere crop around a random point); 0 = no cap. Default the reference's: ScanNet
            100000, S3DIS and Structured3D no cap. Those two also keep only 60 % / 80 % of their
            points, the reference's ratio crop (fixed; with a cap as well, the smaller wins).
            Datasets a given dict leaves out keep their default
            (``data.crop_points={s3dis: 80000}`` still caps ScanNet at 100000).
        loop: repeat the first (main) dataset's scene list this many times per epoch (the
            others cycle anyway).
        check: quick header check of the data root before training.
        features: the point attributes ``feat`` concatenates, in order, 3 channels each
            (``model.in_channels`` = 3 x their number): ``[color, normal]`` as the reference's
            SpUNet / PTv3 / PPT configs, ``[coord, color, normal]`` as its Sonata / Concerto
            configs (``coord`` = the sample's centred coordinates after augmentation, as there).
        label_budget: data-efficient training (ScanNet Data Efficient "-la20/50/100/200"): keep
            this many labelled points per training scene, every other label set to ignore; 0 =
            every label. Drawn once per scene among its labelled raw points (before voxelisation,
            as the reference masks its points) from ``train.seed`` and the scene name; the
            lists are written to ``exp/<name>/label_budget.json`` (``ppt.data.efficiency``).
        scene_fraction: keep this share of each training dataset's scenes (seeded by
            ``train.seed``; "-lr1/5/10/20" = 0.01 ... 0.2); list in ``exp/<name>/scenes.json``.
    """

    root: str = "data"
    mix: dict[str, int] = field(default_factory=lambda: {"scannet": 1})
    val: list[str] = field(default_factory=list)
    voxel_size: float = 0.02
    batch_size: int = 12
    num_workers: int = 4
    mix3d_prob: float = 0.8
    augment: bool = True
    elastic: bool = True
    color_drop: float = 0.0
    crop_points: dict[str, int] = field(default_factory=lambda: {"scannet": 100_000, "s3dis": 0,
                                                                 "structured3d": 0})
    loop: int = 1
    check: bool = True
    features: tuple[str, ...] = ("color", "normal")
    label_budget: int = 0
    scene_fraction: float = 1.0


@dataclass
class ModelConfig:
    """Segmentor: SpUNet widths, prompt adapter, category-alignment head and text encoder.

    Args:
        channels: 8 stage widths (4 encoder, 4 decoder).
        layers: 8 stage depths (basic blocks per stage).
        in_channels: input feature channels (colour + normal = 6).
        prompt: "none", "pdnorm", "inject" or "xattn".
        prompt_dim: domain prompt length.
        decoupled_bn: PDNorm keeps BN statistics per dataset.
        zero_init: zero-initialise the prompt modulation (training starts as the plain network).
        prompt_adaptive: PDNorm modulates with the prompt; false leaves decoupled norms only
            (the reference's ``norm_adaptive=False`` / ``pdnorm_adaptive=False`` models, e.g.
            PPT-v1m2 and SpUNet-v1m3 pdnorm-base; converted with ``tools/convert.py``).
        stem_channels: width of the SpUNet's k5 stem (the reference's ``base_channels``).
        head: "language", "decoupled" or "union".
        text_encoder: "minilm" (offline) or "clip:<model>:<pretrained tag or path>".
        template: text template of a class name for the language head.
        logit_scale: logit scale of the language head (fixed, as the reference), or the start
            value of a learnt one.
        logit_scale_learnable: learn the language head's logit scale (CLIP's parametrisation,
            capped at 100; bench/RESULTS.md §13).
        backbone: "spunet" (SparseUNet; ``channels`` / ``layers`` above) or "ptv3" (Point
            Transformer V3; its settings are the top-level ``ptv3`` section).
    """

    channels: tuple[int, ...] = (32, 64, 128, 256, 256, 128, 96, 96)
    layers: tuple[int, ...] = (2, 3, 4, 6, 2, 2, 2, 2)
    in_channels: int = 6
    prompt: str = "pdnorm"
    prompt_dim: int = 256
    decoupled_bn: bool = True
    zero_init: bool = True
    prompt_adaptive: bool = True
    stem_channels: int = 32
    head: str = "language"
    text_encoder: str = "minilm"
    template: str = "a point of {}"
    logit_scale: float = 100.0
    logit_scale_learnable: bool = False
    backbone: str = "spunet"


@dataclass
class OptimConfig:
    """Optimiser and learning-rate schedule (one peak lr per parameter group).

    Args:
        name: "sgd" or "adamw".
        lr: peak learning rate of the base group.
        prompt_lr_scale: prompt-related parameters (``model.prompt_parameters()``) train at
            ``lr * prompt_lr_scale``.
        block_lr_scale: the backbone blocks' parameters (``model.block_parameters()``) train at
            ``lr * block_lr_scale`` (the PTv3 recipe: 0.1; 1 = no separate group).
        momentum, nesterov: SGD only.
        betas: AdamW only.
        weight_decay: decoupled (AdamW) or L2 (SGD) weight decay.
        scheduler: "onecycle" or "cosine" (linear warm-up then cosine to ``lr / final_div_factor``).
        pct_start: share of the steps spent warming up.
        div_factor: initial lr = peak / div_factor (OneCycle).
        final_div_factor: final lr = initial lr / final_div_factor (OneCycle) or peak /
            final_div_factor (cosine).
        grad_clip: max gradient norm; 0 disables clipping.
        cycle_momentum: OneCycle also cycles SGD's momentum (AdamW's beta1) inversely to the
            lr, from ``max_momentum`` down to ``base_momentum`` and back, as torch's OneCycleLR
            does by default and the reference recipe runs (SGD's ``momentum`` is then unused).
        base_momentum, max_momentum: the momentum range of that cycle.
    """

    name: str = "sgd"
    lr: float = 0.05
    prompt_lr_scale: float = 0.1
    block_lr_scale: float = 1.0
    momentum: float = 0.9
    nesterov: bool = True
    betas: tuple[float, ...] = (0.9, 0.999)
    weight_decay: float = 1e-4
    scheduler: str = "onecycle"
    pct_start: float = 0.05
    div_factor: float = 10.0
    final_div_factor: float = 1e4
    grad_clip: float = 0.0
    cycle_momentum: bool = True
    base_momentum: float = 0.85
    max_momentum: float = 0.95


@dataclass
class TrainConfig:
    """Loop, precision, evaluation, checkpointing and logging.

    Args:
        epochs: training epochs (an epoch = one pass over the first dataset of ``data.mix``).
        seed: seed of model init, data order, augmentation and Mix3D.
        amp: mixed precision on CUDA (bf16 autocast where supported, else fp16), always with
            loss scaling: spconv runs its convolutions in fp16 under any CUDA autocast. CPU is fp32.
        device: "auto" (CUDA if available), "cpu" or "cuda".
        eval_every: evaluate every N epochs and after the last one (0 = never: no val set is built).
        best_on: what ``model_best.pth`` is chosen by: "first" (the first evaluated dataset:
            the first of ``data.val``, else of ``data.mix``; the reference keeps the best of its
            main val dataset), "mean" (mean mIoU over the evaluated datasets) or a dataset name.
        precise_bn: before every evaluation and before the final checkpoint, recompute each
            dataset's BatchNorm running statistics over this many training batches of that
            dataset (no gradients; ``ppt.engine.precise_bn``); 0 = off. Short runs and datasets
            with a small share of the steps otherwise evaluate with stale statistics
            (momentum 0.01).
        checkpoint_every: also write ``model_last.pth`` every N steps (0 = once per epoch).
        max_nonfinite: stop after this many consecutive skipped (non-finite) steps.
        steps_per_epoch: cap on steps per epoch (0 = the loader's full epoch); for demos/tests.
        log_every: write a train.log / TensorBoard line every N steps.
        threads: torch CPU threads per process; N > 0 = N, fixed; 0 = auto: one per core that
            other processes and the loader workers leave free at start-up, shared between this
            machine's training processes, then fixed (OpenMP threads on a core another job keeps
            busy stall every step; ``ppt.engine.threads``); -1 = auto, re-checked every 5 s
            between steps, so a job that starts later does not stall the run (each change is a
            train.log line and the ``train/torch_threads`` scalar). -1 is not reproducible: the
            thread count changes CPU results (torch's BatchNorm reduction), so with -1 they
            depend on the machine's load; N repeats a run bit for bit, and so does 0 while its
            start-up choice (logged) is the same.
        sync_bn: with several processes, normalise with the statistics of the global batch
            (``ppt.engine.distributed.SyncBatchNorm1d``), as one process would.
        loss: "ce" (cross-entropy) or "ce+lovasz" (+ Lovasz-softmax, equal weights: the PTv3
            recipe); ``ppt.losses``.
    """

    epochs: int = 100
    seed: int = 0
    amp: bool = True
    device: str = "auto"
    eval_every: int = 1
    best_on: str = "first"
    precise_bn: int = 0
    checkpoint_every: int = 0
    max_nonfinite: int = 20
    steps_per_epoch: int = 0
    log_every: int = 10
    threads: int = 0
    sync_bn: bool = True
    loss: str = "ce"


@dataclass
class PeftConfig:
    """Fine-tuning stage on top of trained base weights (``ppt.models.peft``; SPEC §8).

    Args:
        stage: "none" (plain training) or full / linear / decoder / bitfit / lora / dapt /
            pointpeft (``ppt.models.peft.stages``).
        base: base weights the stage starts from (``tools/train.py --weights`` sets it).
        reduction: DAPT bottleneck r = max(min_rank, C // reduction).
        min_rank: smallest bottleneck width.
        dropout: DAPT adapter dropout (the reference's 0.2 on ScanObjectNN PB_T50_RS).
        ssf: DAPT also trains SSF scale-and-shift parameters after the blocks' layers, on the
            internal prompts, after the stem and on the backbone output (the reference's
            ``tfts``; ``ppt.models.peft.dapt``).
        num_tokens: Point-PEFT prompt tokens per encoder block.
        prior_rank: Point-PEFT bottleneck width of the retrieved-set adapter (the reference's 8).
        adapter_rank: Point-PEFT width of the MLP-output and output adapters (the reference's 16).
        adapter_dropout: Point-PEFT adapters' dropout (the reference's 0.1).
        prompt_dropout: Point-PEFT dropout on the learnable prompt tokens, training only (0.1).
        prompt_coords: Point-PEFT learnable prompt coordinates (prompts as extra centres of the
            ``knn`` geometry operator).
        geo_operator: Point-PEFT geometry-aware operator: ``knn`` (the reference's: attention in
            kNN groups, max-pool, propagation x 0.3) or ``conv`` (a bottleneck around a 3x3x3
            submanifold conv).
        geo_k: ``knn``: voxels per group (the reference's 16).
        geo_stride: ``knn``: one group centre per occupied geo_stride^3 cell of voxels.
        geo_reduction: ``conv``: bottleneck r = max(min_rank, C_out // geo_reduction).
        neighbour_attention: ``conv``: mix neighbours by weight-free attention instead of the
            3x3x3 submanifold conv.
        train_biases: Point-PEFT also trains the blocks' biases (norm1 / norm2; PTv3 also the
            attention projection and MLP fc1 / fc2), as the reference's fine-tuning.
        top_k: memory-bank entries retrieved per scene.
        temperature: softmax temperature of the retrieval weights (1: the reference's).
        exclude_own: retrieval masks the query's own scene (false: the reference's).
        input_grad_only: frozen sparse convs skip the filter gradient and keep no input.
        no_grad_prefix: run the frozen prefix of the backbone without autograd.
        train_norms: DAPT also trains the norm affines (SPEC §8's first design); off: the
            backbone is frozen whole, norms included, as the DAPT paper (frozen norms then run
            as a constant scale-and-shift that keeps no input for backward).
        recompute_blocks: adapted blocks keep only their input and are recomputed in backward
            (less memory, ~10 % more time).
        lora_rank, lora_alpha, lora_dropout: LoRA's r, alpha (update scale alpha / r) and input
            dropout (the reference's 8, 16, 0.1).
        lora_targets: encoder layers LoRA adapts: ``qkv`` (PTv3: attention qkv; SpUNet: the
            blocks' two 3x3x3 convs), PTv3 also ``proj`` and ``mlp`` (fc1, fc2).
        train_stem: `lora` / `decoder` also train the stem (embedding); the reference freezes
            it (``freeze_encoder=True`` freezes embedding and encoder).
    """

    stage: str = "none"
    base: str = ""
    reduction: int = 6
    min_rank: int = 8
    dropout: float = 0.2
    ssf: bool = False
    num_tokens: int = 10
    prior_rank: int = 8
    adapter_rank: int = 16
    adapter_dropout: float = 0.1
    prompt_dropout: float = 0.1
    prompt_coords: bool = True
    geo_operator: str = "knn"
    geo_k: int = 16
    geo_stride: int = 2
    geo_reduction: int = 12
    neighbour_attention: bool = False
    train_biases: bool = True
    top_k: int = 8
    temperature: float = 0.1
    exclude_own: bool = True
    input_grad_only: bool = True
    no_grad_prefix: bool = True
    train_norms: bool = False
    recompute_blocks: bool = True
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.1
    lora_targets: list[str] = field(default_factory=lambda: ["qkv"])
    train_stem: bool = False


@dataclass
class Config:
    """One experiment. Sections: ``data``, ``model``, ``optim``, ``train``, ``peft``, ``ptv3``,
    ``datasets``.

    ``datasets`` describes every dataset the run names that is not built in (name -> the
    content of its ``dataset.yaml``, :class:`ppt.data.dataset_file.DatasetSpec`). It is filled
    from ``<data.root>/<name>/dataset.yaml`` when the config is validated and saved with the run,
    so a trained model keeps its label spaces without the data folder; a config may also write
    a description inline.
    """

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    ptv3: PTv3Config = field(default_factory=PTv3Config)
    datasets: dict[str, DatasetSpec] = field(default_factory=dict)

    def dataset_info(self, name: str) -> DatasetInfo:
        """Label space and splits of dataset ``name``: built in, described in ``datasets``, or
        read from ``<data.root>/<name>/dataset.yaml`` (the one resolver every caller uses)."""
        return resolve_dataset(name, self.data.root, self.datasets)

    def to_dict(self) -> dict:
        """Plain YAML-friendly dict (tuples as lists)."""
        return plain(dataclasses.asdict(self))


# ---------------------------------------------------------------------------------------------
# Files and overrides

def load_config(path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read, override and validate a config.

    Args:
        path: YAML file (None = defaults only).
        overrides: ``key=value`` strings applied on top of the file.

    Raises:
        ConfigError: unreadable file, unknown key (with the nearest valid key), wrong type or
            invalid value; the message names the file or the override.
    """
    data: dict = {}
    where = ""
    if path is not None:
        where = f" in {path}"
        try:
            text = Path(path).read_text()
        except OSError as err:
            raise ConfigError(f"cannot read config {path}: {err.strerror or err}") from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config {path} is not valid YAML: {err}") from None
        cfg = from_dict(Config, data, "", where)  # file errors name the file
        data = cfg.to_dict()
    if overrides:
        where = " (command-line override)"
        data = merge_sections(data, parse_overrides(overrides), set(field_types(Config)))
    return validate(from_dict(Config, data, "", where), where)


def config_from_dict(data: dict, where: str = "") -> Config:
    """Validate a plain dict (e.g. the config stored in a checkpoint)."""
    return validate(from_dict(Config, data, "", where), where)


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write ``cfg`` as YAML atomically (temp file + rename)."""
    text = yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=None)
    atomic_write(path, lambda f: f.write(text.encode()))
