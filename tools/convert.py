"""Convert Pointcept (the reference) checkpoints into experiments of this project, and back.

    # import: a Pointcept checkpoint + the config it was trained with (or a preset name)
    python tools/convert.py model_best.pth --config semseg-ppt-v1m1-0-sc-st-spunet.py --name ppt_ref
    python tools/convert.py model_best.pth --config ppt-ptv3-extreme-scannet --name ptv3_ppt
    # export: an experiment -> {"state_dict": ...} for the reference model of the same config
    python tools/convert.py exp/ppt_ref --to pointcept --out ppt_ref_pointcept.pth

Import writes ``<exp-root>/<name>/`` (``config.yaml``, ``model/model_best.pth``,
``convert.json`` with the source and the reference model dict) for ``tools/test.py --exp``,
``tools/infer.py --exp``, ``tools/train.sh --weights <exp>/model/model_best.pth`` and ``--peft``.
Configs are Pointcept's Python files, read without running them (``ppt.interop.pointcept_config``;
their ``_base_`` files must sit where the config says, as in a Pointcept checkout). Presets:
``--list-presets``.

Export without ``--config`` uses the reference model recorded at import; for a SpUNet trained here
it derives one (SpUNet-v1m1 or PPT-v1m1 + SpUNet-v1m3) and writes it as ``<out>.model.py``.

Import also carries the reference config's training recipe over into ``config.yaml`` (optimiser,
OneCycle schedule, loss, the "block" parameter group's lr scale, epochs, batch size, gradient
clipping, Mix3D, AMP): it prints each key set and each setting that has no counterpart here
(``not mapped:``), and ``convert.json`` keeps both lists (``recipe``, ``not_mapped``). A preset
holds the reference model, not its recipe, unless it says otherwise: give the config file.

Exit status: 0 done; 2 for anything the converter does not understand (bad command line, missing
or corrupt file, unknown model type, a checkpoint of another model type than ``--config``, a key
it cannot map, a shape that contradicts the config): one ``error:`` line, nothing written.
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

EXIT_STATUS = "exit status: 0 done; 2 a user error (one error: line, nothing written)"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=EXIT_STATUS,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", nargs="?", help="Pointcept checkpoint (import) or experiment folder (--to pointcept)")
    parser.add_argument("--config", help="Pointcept config file (.py) or preset name")
    parser.add_argument("--name", help="experiment name to write (import)")
    parser.add_argument("--exp-root", default="exp", help="folder of experiments (default exp)")
    parser.add_argument("--to", choices=("ppt", "pointcept"), default="ppt",
                        help="ppt: import a Pointcept checkpoint (default); pointcept: export an experiment")
    parser.add_argument("--out", help="checkpoint file to write (export)")
    parser.add_argument("--list-presets", action="store_true", help="print the preset names and exit")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from ppt.interop import ConversionError
    from ppt.interop.pointcept_presets import PRESETS

    if args.list_presets:
        for name, preset in PRESETS.items():
            result = f"  [reference: {preset['reference_result']}]" if "reference_result" in preset else ""
            print(f"{name:28s} {preset['source']}{result}")
        return 0
    needed = ["source", "config", "name"] if args.to == "ppt" else ["source", "out"]
    missing = [f"--{n}" if n != "source" else "SOURCE" for n in needed if not getattr(args, n)]
    if missing:
        print(f"error: {' and '.join(missing)} required for --to {args.to}", file=sys.stderr)
        return 2
    warnings.filterwarnings("ignore", category=FutureWarning)  # spconv's import-time notices
    from ppt.interop.pointcept import export_experiment, import_checkpoint

    try:
        if args.to == "ppt":
            folder = import_checkpoint(args.source, args.config, args.name, args.exp_root)
            record = json.loads((folder / "convert.json").read_text())
            print(f"wrote {folder} (config.yaml, model/model_best.pth, convert.json)")
            for note in record["notes"]:
                print(f"note: {note}")
            if record["recipe"]:
                print("training recipe from the reference config (config.yaml):")
                for m in record["recipe"]:
                    print(f"  {m['key']} = {m['value']}  ({m['from']})")
            for line in record["not_mapped"]:
                print(f"not mapped: {line}")
        else:
            out = export_experiment(args.source, args.out, args.config)
            print(f"wrote {out}")
    except ConversionError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
