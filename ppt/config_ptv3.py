"""Typed settings of the Point Transformer V3 backbone: the ``ptv3`` section of ``ppt.config``."""
from __future__ import annotations

from dataclasses import dataclass


PTV3_ORDERS = ("z", "z-trans", "hilbert", "hilbert-trans")  # = ppt.models.serialization.ORDERS
PTV3_CHOICES = {"pooling": ("serialized", "grid"), "stem": ("conv", "linear"),  # = ppt.models.ptv3's
                "resample_norm": ("batch", "layer"), "unpool_cpe": ("sum", "skip")}
MAX_SERIAL_DEPTH = 21  # = ppt.models.serialization.MAX_DEPTH


@dataclass
class PTv3Config:
    """Point Transformer V3 backbone, used when ``model.backbone`` is "ptv3" (``ppt.models.ptv3``).

    Defaults are the paper's (about 46.2 M parameters); its grid is ``data.voxel_size`` (0.02).
    ``model.in_channels``, ``model.prompt`` and the head apply as for SpUNet.

    Args:
        enc_depths: blocks per encoder stage (5 stages, pooled by 2 between stages).
        enc_channels: encoder stage widths.
        enc_heads: attention heads per encoder stage (each width divisible by its heads).
        dec_depths: blocks per decoder stage, finest stage first (one stage fewer).
        dec_channels: decoder stage widths, finest first (``dec_channels[0]`` feeds the head).
        dec_heads: attention heads per decoder stage, finest first.
        patch_size: voxels per attention patch.
        mlp_ratio: MLP hidden width / channels.
        drop_path: largest stochastic-depth rate (linear over the blocks from 0).
        orders: serialization orders (z, z-trans, hilbert, hilbert-trans), cycled over the blocks.
        shuffle_orders: shuffle the order list at every forward and pooling in training.

    Reference variants (Pointcept PT-v3m1 / PT-v3m2; ``tools/convert.py`` sets them for imported
    models; the defaults are this project's model = PT-v3m1 with PT-v3m2's decoder CPE input):

    Args:
        serial_depth: bits per axis of the serialization codes (16: a sample's order never
            depends on its batch); 0 = from the batch's largest grid coordinate, as the reference
            (``int(max + 1).bit_length()``): the Hilbert orders of an imported model exactly.
        pooling: "serialized" (coarse codes = fine codes >> 3, PT-v3m1) or "grid" (each coarse
            level serialized again at its own data depth, PT-v3m2; differs only with
            ``serial_depth: 0``).
        stem: "conv" (subm conv k5, PT-v3m1) or "linear" (PT-v3m2's Linear embedding).
        resample_norm: norm of stem, pooling and unpooling: "batch" (PT-v3m1) or "layer"
            (PT-v3m2's LayerNorm everywhere; prompt-driven with ``model.prompt: pdnorm``).
        unpool_cpe: what the first decoder block's positional-encoding conv reads: "sum" (the
            unpooled features, PT-v3m2) or "skip" (only the projected skip features, PT-v3m1).
        layer_scale: LayerScale init on both residual branches of every block (0 = none).
        enc_mode: encoder only (PT-v3m2 ``enc_mode``, Sonata / Concerto): the features of every
            stage are brought back to full resolution and concatenated (``sum(enc_channels)``
            wide, the reference's pooling_parent walk); the ``dec_*`` keys are unused.
    """

    enc_depths: tuple[int, ...] = (2, 2, 2, 6, 2)
    enc_channels: tuple[int, ...] = (32, 64, 128, 256, 512)
    enc_heads: tuple[int, ...] = (2, 4, 8, 16, 32)
    dec_depths: tuple[int, ...] = (2, 2, 2, 2)
    dec_channels: tuple[int, ...] = (64, 64, 128, 256)
    dec_heads: tuple[int, ...] = (4, 4, 8, 16)
    patch_size: int = 1024
    mlp_ratio: float = 4.0
    drop_path: float = 0.3
    orders: tuple[str, ...] = PTV3_ORDERS
    shuffle_orders: bool = True
    serial_depth: int = 16
    pooling: str = "serialized"
    stem: str = "conv"
    resample_norm: str = "batch"
    unpool_cpe: str = "sum"
    layer_scale: float = 0.0
    enc_mode: bool = False


def validate_ptv3(cfg, bad) -> None:
    """Shapes and ranges of ``cfg.ptv3`` (a ``ppt.config.Config``; every PEFT stage runs on
    PTv3). ``bad(key, message)`` makes the ConfigError ``ppt.config_checks.validate`` raises."""
    p = cfg.ptv3
    if not (len(p.enc_depths) == len(p.enc_channels) == len(p.enc_heads) >= 2):
        raise bad("ptv3.enc_depths", "ptv3.enc_channels and ptv3.enc_heads need the same length (>= 2 stages), "
                                     f"got {len(p.enc_depths)}, {len(p.enc_channels)}, {len(p.enc_heads)}")
    for key, valid in PTV3_CHOICES.items():
        if getattr(p, key) not in valid:
            raise bad(f"ptv3.{key}", f"is {getattr(p, key)!r}; valid: {', '.join(valid)}")
    if not 0 <= p.serial_depth <= MAX_SERIAL_DEPTH:
        raise bad("ptv3.serial_depth", f"must be in [0, {MAX_SERIAL_DEPTH}] (0 = from the data), got {p.serial_depth}")
    if p.layer_scale < 0:
        raise bad("ptv3.layer_scale", f"must be >= 0 (0 = no LayerScale), got {p.layer_scale}")
    for key in () if p.enc_mode else ("dec_depths", "dec_channels", "dec_heads"):
        if len(getattr(p, key)) != len(p.enc_depths) - 1:
            raise bad(f"ptv3.{key}", f"needs {len(p.enc_depths) - 1} entries (one fewer than the encoder), "
                                     f"got {len(getattr(p, key))}")
    for key in ("enc_depths", "enc_channels", "enc_heads", "dec_depths", "dec_channels", "dec_heads"):
        if any(v < 1 for v in getattr(p, key)):
            raise bad(f"ptv3.{key}", f"entries must be >= 1, got {list(getattr(p, key))}")
    for kind in ("enc",) if p.enc_mode else ("enc", "dec"):
        for c, h in zip(getattr(p, f"{kind}_channels"), getattr(p, f"{kind}_heads")):
            if c % h:
                raise bad(f"ptv3.{kind}_heads", f"must divide the stage widths; {c} channels, {h} heads")
    if p.patch_size < 1 or p.mlp_ratio <= 0 or not 0.0 <= p.drop_path < 1.0:
        raise bad("ptv3.patch_size", f"must be >= 1, mlp_ratio > 0 and drop_path in [0, 1); got "
                                     f"{p.patch_size}, {p.mlp_ratio}, {p.drop_path}")
    unknown = [o for o in p.orders if o not in PTV3_ORDERS]
    if not p.orders or unknown:
        raise bad("ptv3.orders", f"must be a non-empty list of {', '.join(PTV3_ORDERS)}; got {list(p.orders)}")
