"""Named released models of the reference (Pointcept) -> the reference config values they need.

``tools/convert.py CKPT --config <preset>`` stands for ``--config <the reference config file>``
when no Pointcept checkout is at hand. Each preset holds what the converter reads of a config:
the ``model`` dict (copied from the reference file named in ``source``, commit
``d74c646db6abec569d0f23e0c34e7ddfce142789``) and the few ``data`` entries that name the label
space (``names``, ``num_classes``, the val dataset ``type``), the training recipe (``recipe``:
optimizer, scheduler, param_dicts, epoch, batch size, Mix3D, AMP, clipping), plus the reference's own published
result for those weights where it publishes one (``reference_result``: the reference's number,
not measured here).

PTv3 presets belong to the PTv3 family (``ppt.interop.pointcept_ptv3``); the converter picks the
family by the backbone ``type``.
"""
from __future__ import annotations

# PPT-v1m1's joint label table (configs/scannet/semseg-ppt-v1m1-0-sc-st-spunet.py and the
# PTv3 ppt-extreme configs): one text row per name, ``valid_index[i]`` the rows of condition i.
PPT_CLASS_NAME = (
    "wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door",
    "window", "bookshelf", "bookcase", "picture", "counter", "desk", "shelves", "curtain",
    "dresser", "pillow", "mirror", "ceiling", "refrigerator", "television", "shower curtain", "nightstand",
    "toilet", "sink", "lamp", "bathtub", "garbagebin", "board", "beam", "column",
    "clutter", "otherstructure", "otherfurniture", "otherprop",
)
PPT_VALID_INDEX = (
    (0, 1, 2, 3, 4, 5, 6, 7, 8, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 23, 25, 26, 33, 34, 35),
    (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 13, 15, 20, 22, 24, 25, 27, 34),
    (0, 1, 4, 5, 6, 7, 8, 10, 19, 29, 30, 31, 32),
)
PPT_CONDITIONS = ("Structured3D", "ScanNet", "S3DIS")
PDNORM_CONDITIONS = ("ScanNet", "S3DIS", "Structured3D")
SCANNET_NAMES = (
    "wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window", "bookshelf",
    "picture", "counter", "desk", "curtain", "refridgerator", "shower curtain", "toilet", "sink",
    "bathtub", "otherfurniture",
)
CE = dict(type="CrossEntropyLoss", loss_weight=1.0, ignore_index=-1)
LOVASZ = dict(type="LovaszLoss", mode="multiclass", loss_weight=1.0, ignore_index=-1)
SCANNET_DATA = dict(num_classes=20, names=list(SCANNET_NAMES), val=dict(type="ScanNetDataset"))


def _ppt_head(backbone: dict, out_channels: int, criteria: list) -> dict:
    return dict(type="PPT-v1m1", backbone=backbone, criteria=criteria, backbone_out_channels=out_channels,
                context_channels=256, conditions=PPT_CONDITIONS, template="[x]", clip_model="ViT-B/16",
                class_name=PPT_CLASS_NAME, valid_index=PPT_VALID_INDEX, backbone_mode=False)


def _ptv3(**changes) -> dict:
    base = dict(
        type="PT-v3m1", in_channels=6, order=("z", "z-trans", "hilbert", "hilbert-trans"), stride=(2, 2, 2, 2),
        enc_depths=(2, 2, 2, 6, 2), enc_channels=(32, 64, 128, 256, 512), enc_num_head=(2, 4, 8, 16, 32),
        enc_patch_size=(1024,) * 5, dec_depths=(2, 2, 2, 2), dec_channels=(64, 64, 128, 256),
        dec_num_head=(4, 4, 8, 16), dec_patch_size=(1024,) * 4, mlp_ratio=4, qkv_bias=True, qk_scale=None,
        attn_drop=0.0, proj_drop=0.0, drop_path=0.3, shuffle_orders=True, pre_norm=True, enable_rpe=False,
        enable_flash=True, upcast_attention=False, upcast_softmax=False, enc_mode=False, pdnorm_bn=False,
        pdnorm_ln=False, pdnorm_decouple=True, pdnorm_adaptive=False, pdnorm_affine=True,
        pdnorm_conditions=PDNORM_CONDITIONS,
    )
    return {**base, **changes}


# The training recipe of each config (its own keys over _base_/default_runtime.py's), read by
# ppt.interop.pointcept_recipe as from the file: tests/test_rough_edges.py compares each preset's
# recipe with the one read from the reference file itself (tests/fixtures/pointcept/configs).
_RUNTIME = dict(gradient_accumulation_steps=1, eval_epoch=100, clip_grad=None, sync_bn=False)


def _recipe(batch_size: int, epoch: int, optimizer: dict, max_lr, final_div: float, **extra) -> dict:
    scheduler = dict(type="OneCycleLR", max_lr=max_lr, pct_start=0.05, anneal_strategy="cos", div_factor=10.0,
                     final_div_factor=final_div)
    return {**_RUNTIME, "batch_size": batch_size, "mix_prob": 0.8, "enable_amp": True, "epoch": epoch,
            "optimizer": optimizer, "scheduler": scheduler, "param_dicts": None, **extra}


_SGD = dict(type="SGD", lr=0.05, momentum=0.9, weight_decay=0.0001, nesterov=True)
_SPUNET = dict(in_channels=6, channels=(32, 64, 128, 256, 256, 128, 96, 96), layers=(2, 3, 4, 6, 2, 2, 2, 2))

PRESETS: dict[str, dict] = {
    "spunet-scannet": dict(
        source="configs/scannet/semseg-spunet-v1m1-0-base.py",
        model=dict(type="DefaultSegmentor", backbone=dict(type="SpUNet-v1m1", num_classes=20, **_SPUNET),
                   criteria=[CE]),
        data=SCANNET_DATA,
        recipe=_recipe(12, 800, _SGD, 0.05, 10000.0),
    ),
    "ppt-spunet-sc-st": dict(
        source="configs/scannet/semseg-ppt-v1m1-0-sc-st-spunet.py",
        model=_ppt_head(dict(type="SpUNet-v1m3", num_classes=0, base_channels=32, context_channels=256,
                             enc_mode=False, conditions=PDNORM_CONDITIONS, zero_init=False,
                             norm_decouple=True, norm_adaptive=True, norm_affine=True, **_SPUNET),
                        96, [CE]),
        data=SCANNET_DATA,
        recipe=_recipe(24, 100, _SGD, 0.05, 10000.0),
    ),
    "ptv3-scannet": dict(
        source="configs/scannet/semseg-pt-v3m1-0-base.py",
        model=dict(type="DefaultSegmentorV2", num_classes=20, backbone_out_channels=64, backbone=_ptv3(),
                   criteria=[CE, LOVASZ]),
        data=SCANNET_DATA,
        recipe=_recipe(12, 800, dict(type="AdamW", lr=0.006, weight_decay=0.05), [0.006, 0.0006], 1000.0,
                       param_dicts=[dict(keyword="block", lr=0.0006)]),
        reference_result="ScanNet val mIoU 77.6 (Pointcept README, PTv3 model zoo)",
    ),
    "ppt-ptv3-extreme-scannet": dict(
        source="configs/scannet/semseg-pt-v3m1-1-ppt-extreme.py",
        model=_ppt_head(_ptv3(enc_depths=(3, 3, 3, 6, 3), enc_channels=(48, 96, 192, 384, 512),
                              enc_num_head=(3, 6, 12, 24, 32), dec_depths=(3, 3, 3, 3),
                              dec_channels=(64, 96, 192, 384), dec_num_head=(4, 6, 12, 24),
                              pdnorm_bn=True, pdnorm_ln=True),
                        64, [CE, LOVASZ]),
        data=SCANNET_DATA,
        recipe=_recipe(24, 100, dict(type="AdamW", lr=0.005, weight_decay=0.05), [0.005, 0.0005], 1000.0,
                       param_dicts=[dict(keyword="block", lr=0.0005)], clip_grad=3.0),
        reference_result="ScanNet val mIoU 78.5 (Pointcept README, PTv3 + PPT model zoo)",
    ),
}
