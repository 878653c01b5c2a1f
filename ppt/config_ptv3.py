"""Typed settings of the Point Transformer V3 backbone: the ``ptv3`` section of ``ppt.config``."""
from __future__ import annotations

from dataclasses import dataclass


PTV3_ORDERS = ("z", "z-trans", "hilbert", "hilbert-trans")  # = ppt.models.serialization.ORDERS


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


def validate_ptv3(cfg, bad) -> None:
    """Shapes and ranges of ``cfg.ptv3`` (a ``ppt.config.Config``); PEFT stages that need SpUNet
    blocks. ``bad(key, message)`` makes the ConfigError ``ppt.config.validate`` raises."""
    p = cfg.ptv3
    if not (len(p.enc_depths) == len(p.enc_channels) == len(p.enc_heads) >= 2):
        raise bad("ptv3.enc_depths", "ptv3.enc_channels and ptv3.enc_heads need the same length (>= 2 stages), "
                                     f"got {len(p.enc_depths)}, {len(p.enc_channels)}, {len(p.enc_heads)}")
    for key in ("dec_depths", "dec_channels", "dec_heads"):
        if len(getattr(p, key)) != len(p.enc_depths) - 1:
            raise bad(f"ptv3.{key}", f"needs {len(p.enc_depths) - 1} entries (one fewer than the encoder), "
                                     f"got {len(getattr(p, key))}")
    for key in ("enc_depths", "enc_channels", "enc_heads", "dec_depths", "dec_channels", "dec_heads"):
        if min(getattr(p, key)) < 1:
            raise bad(f"ptv3.{key}", f"entries must be >= 1, got {list(getattr(p, key))}")
    for kind in ("enc", "dec"):
        for c, h in zip(getattr(p, f"{kind}_channels"), getattr(p, f"{kind}_heads")):
            if c % h:
                raise bad(f"ptv3.{kind}_heads", f"must divide the stage widths; {c} channels, {h} heads")
    if p.patch_size < 1 or p.mlp_ratio <= 0 or not 0.0 <= p.drop_path < 1.0:
        raise bad("ptv3.patch_size", f"must be >= 1, mlp_ratio > 0 and drop_path in [0, 1); got "
                                     f"{p.patch_size}, {p.mlp_ratio}, {p.drop_path}")
    unknown = [o for o in p.orders if o not in PTV3_ORDERS]
    if not p.orders or unknown:
        raise bad("ptv3.orders", f"must be a non-empty list of {', '.join(PTV3_ORDERS)}; got {list(p.orders)}")
    if cfg.model.backbone == "ptv3" and cfg.peft.stage not in ("none", "full"):
        raise bad("peft.stage", f"is {cfg.peft.stage!r}, which adapts SpUNet blocks; with model.backbone "
                                f"ptv3 only none and full are available")
