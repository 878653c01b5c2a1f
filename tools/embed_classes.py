"""Embed the class names of a dataset (or a given list) and save them for the language head.

    python tools/embed_classes.py --dataset scannet --encoder minilm --out scannet_minilm.pt
    python tools/embed_classes.py --classes "chair,sofa,wall" --encoder clip:ViT-B-16:openai --template "{}"

Prints the shape and, per class, its nearest other class by cosine similarity, so a bad
template or a wrong label order shows up before training. The file can be copied to a machine
without network and read with ``ppt.text.load_embeddings``.

Exit status: 0 done; 2 a user error (unknown dataset, no class names, an encoder that is not
available, a bad command line): one ``error:`` line.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ppt.data.classes import DATASETS  # noqa: E402
from ppt.data.dataset_file import get_dataset_info  # noqa: E402
from ppt.text import (  # noqa: E402
    DEFAULT_TEMPLATE, TextEncoderUnavailable, class_embeddings, clip_spec, save_embeddings,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    names = parser.add_mutually_exclusive_group(required=True)
    names.add_argument("--dataset", help=f"built in ({', '.join(DATASETS)}) or a folder of --data-root "
                                         f"with a dataset.yaml")
    names.add_argument("--classes", help="comma-separated class names, in label order")
    parser.add_argument("--encoder", default="minilm", help="minilm | clip:<model>:<pretrained tag or checkpoint>")
    parser.add_argument("--template", default=DEFAULT_TEMPLATE, help="text template with one {}")
    parser.add_argument("--cache-dir", default=None, help="text-embedding cache folder")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None, help="write the embeddings here (.pt)")
    parser.add_argument("--data-root", default="data", help="where --dataset NAME/dataset.yaml is looked for")
    args = parser.parse_args(argv)

    try:
        if args.dataset:
            class_names = list(get_dataset_info(args.dataset, args.data_root).class_names)
        else:
            class_names = [c.strip() for c in args.classes.split(",") if c.strip()]
        emb = class_embeddings(class_names, args.encoder, args.template, args.cache_dir, args.device)
    except (KeyError, ValueError, TextEncoderUnavailable) as e:
        print(f"error: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2

    encoder = args.encoder
    if encoder.startswith("clip:"):  # say which activation the towers were built with
        encoder += " (QuickGELU)" if clip_spec(encoder).quick_gelu else " (GELU)"
    print(f"{len(class_names)} classes, encoder {encoder}, template {args.template!r}: shape {tuple(emb.shape)}")
    sim = emb @ emb.t()
    sim.fill_diagonal_(-2.0)
    width = max(len(n) for n in class_names)
    for i, name in enumerate(class_names):
        if len(class_names) > 1:
            j = int(sim[i].argmax())
            print(f"  {name:<{width}}  nearest: {class_names[j]} ({float(sim[i, j]):.3f})")
    if len(class_names) > 1:
        off = sim[~torch.eye(len(class_names), dtype=torch.bool)]
        print(f"off-diagonal cosine: mean {float(off.mean()):.3f}, max {float(off.max()):.3f}")
    if args.out:
        save_embeddings(args.out, emb, class_names, args.encoder, args.template)
        print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
