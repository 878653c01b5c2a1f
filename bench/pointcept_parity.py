"""Parity with the reference: each Pointcept model type vs its conversion, same batch, eval mode.

    .venv/bin/python bench/pointcept_parity.py --pointcept /path/to/Pointcept [--write-fixtures]

For every model type the reference model is built from a tiny config with random weights
(``bench/pointcept_ref.py``; no CUDA extension needed), given non-trivial state (a few train-mode
forwards per condition for the BN running statistics, random BN affines, prompt modulations and
embedding table, logit scale ln 80 instead of CLIP's ln 100), converted with
``ppt.interop.pointcept``, and both run in eval mode on the same two-scene batch (spconv's Native
algorithm on both sides). Printed per type and condition: max |difference| of the logits and the
max relative difference (max |diff| / max |reference logit|); the export back must give the
reference's state dict exactly. Rows of ``bench/pointcept_parity_ptv3.py`` (``ptv3_cases``) follow
when that file exists. The last lines are ``<type>: max relative difference <x>``.

``--write-fixtures`` writes ``tests/fixtures/pointcept/spunet/<case>.pth`` (reference state dict,
model dict, batch, reference logits per dataset) and ``<case>.py`` (a Pointcept config holding the
model dict and data names) for ``tests/test_convert_spunet.py``.
"""
from __future__ import annotations

import argparse
import math
import pprint
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore", category=FutureWarning)

from bench import pointcept_ref  # noqa: E402
from ppt.interop import pointcept as interop  # noqa: E402
from ppt.interop.pointcept_presets import PPT_CLASS_NAME, PPT_VALID_INDEX, SCANNET_DATA  # noqa: E402
from ppt.interop.pointcept_shared import dataset_of_condition  # noqa: E402

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "pointcept" / "spunet"
CHANNELS, LAYERS, BASE, CONTEXT = (4, 8, 8, 8, 8, 8, 4, 4), (1, 2, 1, 1, 2, 1, 1, 1), 4, 8
CE = [dict(type="CrossEntropyLoss", loss_weight=1.0, ignore_index=-1)]
LOGIT_SCALE = math.log(80.0)


def _ppt(adaptive: bool, affine: bool) -> dict:
    backbone = dict(type="SpUNet-v1m3", in_channels=6, num_classes=0, base_channels=BASE, context_channels=CONTEXT,
                    channels=CHANNELS, layers=LAYERS, enc_mode=False, conditions=("ScanNet", "S3DIS", "Structured3D"),
                    zero_init=False, norm_decouple=True, norm_adaptive=adaptive, norm_affine=affine)
    return dict(type="PPT-v1m1", backbone=backbone, criteria=CE, backbone_out_channels=CHANNELS[-1],
                context_channels=CONTEXT, conditions=("Structured3D", "ScanNet", "S3DIS"), template="[x]",
                clip_model="ViT-B/16", class_name=PPT_CLASS_NAME, valid_index=PPT_VALID_INDEX, backbone_mode=False)


# case name -> (reported type, reference model dict)
CASES = {
    "spunet_v1m1": ("SpUNet-v1m1", dict(type="DefaultSegmentor", criteria=CE, backbone=dict(
        type="SpUNet-v1m1", in_channels=6, num_classes=20, base_channels=BASE, channels=CHANNELS, layers=LAYERS))),
    "ppt_v1m1_spunet_v1m3": ("PPT-v1m1/SpUNet-v1m3", _ppt(adaptive=True, affine=True)),
    "ppt_v1m1_spunet_v1m3_plain_norm": ("PPT-v1m1/SpUNet-v1m3 (norm_adaptive=False, norm_affine=False)",
                                        _ppt(adaptive=False, affine=False)),
}


def make_batch(seed: int = 0, points: int = 250) -> dict:
    """Two scenes of unique voxels: grid_coord (N, 3) int32, feat (N, 6), offset (2,), coord."""
    g = torch.Generator().manual_seed(seed)
    scenes = [torch.unique(torch.randint(0, 14, (points, 3), generator=g), dim=0) for _ in range(2)]
    grid = torch.cat(scenes).int()
    feat = torch.randn(len(grid), 6, generator=g)
    offset = torch.tensor([len(scenes[0]), len(grid)])
    return dict(grid_coord=grid, feat=feat, offset=offset, coord=grid.float() * 0.02)


def conditions_of(model_cfg: dict) -> list[tuple[str, str | None]]:
    """(our dataset, reference condition or None) pairs a case is evaluated on."""
    if model_cfg["type"] == "PPT-v1m1":
        return [(dataset_of_condition(c), c) for c in model_cfg["conditions"]]
    return [("scannet", None)]


def reference_input(batch: dict, condition: str | None) -> dict:
    out = {k: v.clone() for k, v in batch.items()}
    if condition is not None:
        out["condition"] = [condition]
    return out


def randomise(ref: torch.nn.Module, model_cfg: dict, seed: int) -> None:
    """Give the reference model state that a wrong mapping cannot pass by accident."""
    torch.manual_seed(seed)
    ref.train()
    with torch.no_grad():
        for i, (_, cond) in enumerate(conditions_of(model_cfg)):  # BN statistics per condition
            for step in range(3):
                ref(reference_input(make_batch(100 + 10 * i + step, 150), cond) | {"segment": torch.zeros(1)})
        for m in ref.modules():
            if isinstance(m, torch.nn.BatchNorm1d) and m.affine:
                m.weight.normal_(1.0, 0.3)
                m.bias.normal_(0.0, 0.3)
            elif isinstance(m, torch.nn.Linear):  # modulations (zero-init) and the projection head
                m.weight.normal_(0.0, 0.1)
                m.bias.normal_(0.0, 0.1)
        if hasattr(ref, "embedding_table"):
            ref.embedding_table.weight.normal_()
        if hasattr(ref, "logit_scale"):
            ref.logit_scale.fill_(LOGIT_SCALE)
    ref.eval()


class _NoLoss(torch.nn.Module):
    def forward(self, pred, target):
        return pred.sum() * 0


def run_case(pointcept_dir: str, case: str, seed: int) -> dict:
    """Build, randomise, convert, compare; returns rows and what a fixture needs."""
    kind, model_dict = CASES[case]
    ref = pointcept_ref.native_convs(pointcept_ref.build(pointcept_dir, model_dict))
    ref.criteria = _NoLoss()  # train-mode forwards only collect statistics
    randomise(ref, model_dict, seed)
    full = {"model": model_dict, "data": SCANNET_DATA}
    model_cfg = interop.reference_model(full)
    state = {k: v.detach().clone() for k, v in ref.state_dict().items()}
    cfg = interop.config_from_reference(full, model_cfg, state)
    ours_state = interop.convert_state(state, model_cfg, cfg)
    from ppt.engine.build import build_model, text_embeddings_from_state

    ours = build_model(cfg, text_embeddings_from_state(ours_state))
    ours.load_state_dict(ours_state)
    ours.eval()
    batch = make_batch(seed)
    rows, outputs = [], {}
    with torch.no_grad():
        for dataset, cond in conditions_of(model_dict):
            expected = ref(reference_input(batch, cond))["seg_logits"]
            got = ours(dict(batch, dataset=dataset))
            diff = (expected - got).abs().max().item()
            rows.append((kind, dataset, diff, diff / expected.abs().max().item()))
            outputs[dataset] = expected
    back = interop.family_of(model_cfg).to_pointcept(dict(ours.state_dict()), model_cfg)
    if model_cfg["type"] == "PPT-v1m1":
        back["logit_scale"] = torch.tensor(math.log(cfg.model.logit_scale))
    export_ok = set(back) == set(state) and all(
        torch.equal(back[k], state[k]) for k in state if k not in ("class_embedding", "logit_scale"))
    return dict(kind=kind, rows=rows, export_ok=export_ok, state=state, model=model_dict, batch=batch, outputs=outputs)


def write_fixture(case: str, result: dict, seed: int) -> None:
    FIXTURES.mkdir(parents=True, exist_ok=True)
    batch = {k: v for k, v in result["batch"].items() if k != "coord"}
    torch.save({"state_dict": result["state"], "model": interop._plain(result["model"]), "batch": batch,
                "outputs": result["outputs"], "seed": seed}, FIXTURES / f"{case}.pth")
    text = (f"# Tiny reference config written by bench/pointcept_parity.py --write-fixtures (case {case}).\n"
            f"model = {pprint.pformat(result['model'], sort_dicts=False)}\n"
            f"data = {pprint.pformat(SCANNET_DATA, sort_dicts=False)}\n")
    (FIXTURES / f"{case}.py").write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pointcept", required=True, help="local copy of the reference (Pointcept checkout)")
    parser.add_argument("--write-fixtures", action="store_true", help="(re)write tests/fixtures/pointcept/spunet/")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    worst: dict[str, float] = {}
    print(f"{'type':62s} {'dataset':13s} {'max |diff|':>11s} {'max rel diff':>12s}")
    for case in CASES:
        result = run_case(args.pointcept, case, args.seed)
        for kind, dataset, diff, rel in result["rows"]:
            print(f"{kind:62s} {dataset:13s} {diff:11.3e} {rel:12.3e}")
            worst[kind] = max(worst.get(kind, 0.0), rel)
        print(f"{'':62s} export -> reference state dict {'identical' if result['export_ok'] else 'DIFFERS'}")
        if not result["export_ok"]:
            worst[result["kind"]] = float("inf")
        if args.write_fixtures:
            write_fixture(case, result, args.seed)
    ptv3 = Path(__file__).with_name("pointcept_parity_ptv3.py")
    if ptv3.is_file():
        from bench.pointcept_parity_ptv3 import ptv3_cases

        for kind, rel in ptv3_cases(args.pointcept):
            print(f"{kind:62s} {'(ptv3 bench)':13s} {'':>11s} {rel:12.3e}")
            worst[kind] = max(worst.get(kind, 0.0), rel)
    for kind, rel in worst.items():
        print(f"{kind}: max relative difference {rel:.3e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
