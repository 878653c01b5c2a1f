"""Parity of the PTv3 family with the reference (Pointcept): PT-v3m1, PPT-v1m1 / PPT-v1m2 over
PT-v3m1 with decoupled norms (no prompt modulation, as the released configs), PT-v3m2 in encoder
mode (Sonata / Concerto probing; LayerScale and a mask token exercised), PT-v3m2 with its decoder,
PPT-v1m3 over PT-v3m2.

Each case builds the reference model from a tiny config (``bench/pointcept_ref.py``), gives every
norm non-trivial statistics and affines, converts its state dict with this project's converter
(``ppt.interop.pointcept`` + ``ppt.interop.pointcept_ptv3``), runs both in eval mode on the same
two-sample batch and returns max |ours - reference| / max |reference| of the logits.

Orders fixed on both sides: the reference shuffles its order list at every forward and pooling
(also in eval: ``shuffle_orders`` is on in its configs and its poolings' own switch is never
passed down), so the bench turns every ``shuffle_orders`` off; this project never shuffles in eval.
The reference runs its non-flash attention (flash_attn is CUDA-only): it then shrinks the patch to
the smallest sample of the batch, so the scenes are big enough that every sample of every level
has at least a patch of voxels (then both pad and cut patches the same way). The batch reaches grid
coordinate 254 (serialization depth 8, and 8 again one level down), so a fixed depth 16 and
PT-v3m1's shifted codes both give other Hilbert orders than the reference at some level; the
blocks use Hilbert orders (the order list starts with one).

``python bench/pointcept_parity_ptv3.py --pointcept DIR [--fixtures tests/fixtures/pointcept/ptv3]``
prints one line per case; with ``--fixtures`` it also writes each case's reference model config,
state dict, batch and reference logits there (used by ``tests/test_convert_ptv3.py``).
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
import torch.nn as nn

# run as a script, bench/ is sys.path[0] and its peft.py would shadow the `peft` package the
# reference imports: the repository root goes there instead
_BENCH = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _BENCH]
sys.path.insert(0, str(_BENCH.parent))

from bench import pointcept_ref  # noqa: E402
from ppt.data.dataset_file import get_dataset_info  # noqa: E402
from ppt.interop.pointcept_presets import PPT_CLASS_NAME, PPT_VALID_INDEX  # noqa: E402

CONDITIONS = ("Structured3D", "ScanNet", "S3DIS")
DATASETS = {"Structured3D": "structured3d", "ScanNet": "scannet", "S3DIS": "s3dis"}
SCANNET_DATA = {"val": {"type": "ScanNetDataset"}}
PATCH = 8
TINY = dict(in_channels=6, order=("hilbert", "z-trans", "hilbert-trans", "z"), stride=(2, 2, 2),
            enc_depths=(1, 1, 3, 1), enc_channels=(8, 8, 8, 16), enc_num_head=(1, 2, 2, 2),
            enc_patch_size=(PATCH,) * 4, dec_depths=(1, 1, 1), dec_channels=(8, 8, 8),
            dec_num_head=(1, 2, 2), dec_patch_size=(PATCH,) * 3, mlp_ratio=2, qkv_bias=True, qk_scale=None,
            attn_drop=0.0, proj_drop=0.0, drop_path=0.0, shuffle_orders=False, pre_norm=True,
            enable_rpe=False, enable_flash=False, upcast_attention=False, upcast_softmax=False)
M1_PD = dict(pdnorm_bn=True, pdnorm_ln=True, pdnorm_decouple=True, pdnorm_adaptive=False, pdnorm_affine=True,
             pdnorm_conditions=("ScanNet", "S3DIS", "Structured3D"))


def _m1(**kw) -> dict:
    return dict(type="PT-v3m1", **TINY, enc_mode=False, **kw)


def _m2(enc_mode: bool, **kw) -> dict:
    b = dict(type="PT-v3m2", **TINY, traceable=False, mask_token=False, enc_mode=enc_mode, freeze_encoder=False, **kw)
    if enc_mode:
        for key in ("dec_depths", "dec_channels", "dec_num_head", "dec_patch_size"):
            b.pop(key)
    return b


def cases() -> dict[str, dict]:
    """Case name -> {"model": reference model dict, "data": data section, "condition": str}."""
    enc_width = sum(TINY["enc_channels"])
    v1m3_names = [list(get_dataset_info(DATASETS[c]).class_names) for c in CONDITIONS]
    return {
        "PT-v3m1": dict(model=dict(type="DefaultSegmentorV2", num_classes=20, backbone_out_channels=8,
                                   backbone=_m1(), criteria=[]), data=SCANNET_DATA, condition="ScanNet"),
        "PPT-v1m2/PT-v3m1": dict(model=dict(type="PPT-v1m2", backbone=_m1(**M1_PD), criteria=[], backbone_out_channels=8,
                                            context_channels=16, conditions=CONDITIONS, num_classes=(25, 20, 13)),
                                 data={}, condition="S3DIS"),
        "PPT-v1m1/PT-v3m1": dict(model=dict(type="PPT-v1m1", backbone=_m1(**M1_PD), criteria=[], backbone_out_channels=8,
                                            context_channels=16, conditions=CONDITIONS, template="[x]",
                                            clip_model="ViT-B/16", class_name=PPT_CLASS_NAME,
                                            valid_index=PPT_VALID_INDEX, backbone_mode=False),
                                 data={}, condition="ScanNet"),
        "PT-v3m2 (encoder mode)": dict(model=dict(type="DefaultSegmentorV2", num_classes=20,
                                                  backbone_out_channels=enc_width,
                                                  backbone=_m2(True, layer_scale=0.5) | {"mask_token": True},
                                                  criteria=[], freeze_backbone=True),
                                       data=SCANNET_DATA, condition="ScanNet"),
        "PT-v3m2 (decoder)": dict(model=dict(type="DefaultSegmentorV2", num_classes=20, backbone_out_channels=8,
                                             backbone=_m2(False), criteria=[], freeze_backbone=False),
                                  data=SCANNET_DATA, condition="ScanNet"),
        "PPT-v1m3/PT-v3m2": dict(model=dict(type="PPT-v1m3", backbone=_m2(False) | {"traceable": True}, criteria=[],
                                            freeze_backbone=False, backbone_out_channels=8, conditions=CONDITIONS,
                                            template="[x]", clip_model="ViT-B/16", class_names=v1m3_names),
                                 data={}, condition="Structured3D"),
    }


def make_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """Two scenes of random voxels in [0, 63)^3 and [0, 40)^3, the first with one voxel at x = 254
    (data depth 8 at level 0 and 1, where PT-v3m1's shifted codes have 7): (N, 3) grid, (N, 6)."""
    g = torch.Generator().manual_seed(seed)
    scenes = []
    for n, extent in ((350, 63), (250, 40)):
        grid = torch.unique(torch.randint(0, extent, (n, 3), generator=g), dim=0)
        scenes.append(grid[torch.randperm(len(grid), generator=g)])
    scenes[0][0] = torch.tensor([254, 5, 9])
    scenes[0] = torch.unique(scenes[0], dim=0)
    grid = torch.cat(scenes)
    return dict(grid_coord=grid.int(), feat=torch.rand(len(grid), 6, generator=g) * 2 - 1,
                offset=torch.cumsum(torch.tensor([len(s) for s in scenes]), 0))


def randomise(model: nn.Module, seed: int = 1) -> None:
    """Non-trivial statistics / affines of every norm, non-zero biases, LayerScale != init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, (nn.BatchNorm1d, nn.LayerNorm)) and m.weight is not None:
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
            if isinstance(m, nn.BatchNorm1d):
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
        for name, p in model.named_parameters():
            if name.endswith("gamma") or (name.endswith("bias") and p.abs().max() == 0):
                p.copy_(0.5 + 0.2 * torch.randn(p.shape, generator=g) if name.endswith("gamma")
                        else 0.05 * torch.randn(p.shape, generator=g))


def reference_model(pointcept_dir: str | Path, model_cfg: dict) -> nn.Module:
    torch.manual_seed(0)
    model = pointcept_ref.build(pointcept_dir, model_cfg)
    from spconv.core import ConvAlgo
    from spconv.pytorch.conv import SparseConvolution

    for m in model.modules():  # poolings carry their own shuffle switch, on by default
        if hasattr(m, "shuffle_orders"):
            m.shuffle_orders = False
        if isinstance(m, SparseConvolution):  # spconv's CPU kernels (its default is CUDA-only)
            m.algo = ConvAlgo.Native
            if m.bias is not None:  # ... which take no bias: added after the conv, as ours does
                m.forward = _bias_outside(m)
    randomise(model)
    return model.eval()


def _bias_outside(conv: nn.Module):
    forward = type(conv).forward

    def run(x):
        bias = conv.bias
        conv.bias = None
        try:
            out = forward(conv, x)
        finally:
            conv.bias = bias
        return out.replace_feature(out.features + bias)

    return run


def reference_logits(model: nn.Module, batch: dict, condition: str) -> torch.Tensor:
    grid = batch["grid_coord"]
    data = dict(coord=grid.float() * 0.02, grid_coord=grid.clone(), feat=batch["feat"].clone(),
                offset=batch["offset"].clone(), condition=[condition])
    with torch.no_grad():
        return model(data)["seg_logits"]


def our_model(state: dict, case: dict):
    """(this project's converted model, its config) from a reference state dict."""
    from ppt.engine.build import build_model, text_embeddings_from_state
    from ppt.interop.pointcept import config_from_reference, convert_state, reference_model as with_datasets

    ref = {"model": case["model"], "data": case["data"]}
    model_cfg = with_datasets(ref)
    cfg = config_from_reference(ref, model_cfg, state)
    ours = convert_state(dict(state), model_cfg, cfg)
    model = build_model(cfg, text_embeddings_from_state(ours))
    model.load_state_dict(ours, strict=True)
    return model.eval(), cfg, ours


def our_logits(model: nn.Module, batch: dict, condition: str) -> torch.Tensor:
    data = dict(grid_coord=batch["grid_coord"], feat=batch["feat"], offset=batch["offset"],
                dataset=DATASETS[condition])
    with torch.no_grad():
        return model(data)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def reference_state(model: nn.Module, case: dict) -> dict:
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if case["model"]["type"] == "PPT-v1m3":  # a non-persistent buffer there: handed over explicitly
        state["class_embeddings"] = model.class_embeddings.detach().clone()
    return state


def ptv3_cases(pointcept_dir: str | Path, fixtures: str | Path | None = None) -> list[tuple[str, float]]:
    """[(model type, max relative difference of the logits)], one per case; with ``fixtures``
    also writes ``<fixtures>/<case>.pth`` (case: reference model config, data section and condition;
    reference state; reference logits) and ``<fixtures>/batch.pth`` (the batch of every case)."""
    results = []
    batch = make_batch()
    for name, case in cases().items():
        ref_model = reference_model(pointcept_dir, case["model"])
        expected = reference_logits(ref_model, batch, case["condition"])
        state = reference_state(ref_model, case)
        model, _, ours = our_model(state, case)
        got = our_logits(model, batch, case["condition"])
        results.append((name, rel(got, expected)))
        if fixtures is not None:
            out = Path(fixtures)
            out.mkdir(parents=True, exist_ok=True)
            torch.save({"case": copy.deepcopy(case), "state": pack(state), "logits": expected},
                       out / f"{fixture_name(name)}.pth")
    if fixtures is not None:
        torch.save(batch, Path(fixtures) / "batch.pth")
    return results


def pack(state: dict[str, torch.Tensor]) -> dict:
    """A state dict as one flat fp32 tensor + names, shapes and dtypes (a zip record per tensor
    would double a tiny fixture's size); :func:`unpack` inverts it exactly (the integer buffers
    are small counts)."""
    return {"names": list(state), "shapes": [list(v.shape) for v in state.values()],
            "dtypes": [str(v.dtype).removeprefix("torch.") for v in state.values()],
            "flat": torch.cat([v.detach().float().reshape(-1) for v in state.values()])}


def unpack(packed: dict) -> dict[str, torch.Tensor]:
    out, start = {}, 0
    for name, shape, dtype in zip(packed["names"], packed["shapes"], packed["dtypes"]):
        n = int(torch.tensor(shape).prod()) if shape else 1
        out[name] = packed["flat"][start:start + n].reshape(shape).to(getattr(torch, dtype)).clone()
        start += n
    return out


def fixture_name(case: str) -> str:
    return case.lower().replace("/", "_over_").replace(" ", "_").replace("(", "").replace(")", "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pointcept", required=True, help="local Pointcept checkout")
    parser.add_argument("--fixtures", default=None, help="also write test fixtures to this folder")
    args = parser.parse_args()
    for name, value in ptv3_cases(args.pointcept, args.fixtures):
        print(f"{name}: max relative difference {value:.3g}")


if __name__ == "__main__":
    main()
