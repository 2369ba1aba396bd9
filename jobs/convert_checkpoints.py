"""Convert the original Salesforce checkpoints into local model folders the loader reads.

    python jobs/convert_checkpoints.py blip2 --lavis-checkpoint blip2_pretrained.pth \
        --vision-checkpoint eva_vit_g.pth --output DIR
    python jobs/convert_checkpoints.py blip-vqa --checkpoint model_base_vqa_capfilt_large.pth --output DIR

LAVIS's released ``blip2_pretrained.pth`` has no ViT weights (LAVIS saves trainable parameters
only): the ViT comes from ``eva_vit_g.pth``. A single file that already holds ``visual_encoder.*``
needs no ``--vision-checkpoint``. Formats are recognised by their keys, not their file names.
Checkpoints are read with ``torch.load(weights_only=True)`` (no pickle code runs) and written as
safetensors.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jobs.cli import run_main  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="convert_checkpoints.py", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    b2 = sub.add_parser("blip2", help="LAVIS BLIP-2 stage-1 checkpoint -> referee folder")
    b2.add_argument("--lavis-checkpoint", required=True, type=Path,
                    help="blip2_pretrained.pth, or one file that also holds visual_encoder.*")
    b2.add_argument("--vision-checkpoint", type=Path, default=None,
                    help="eva_vit_g.pth (EVA ViT-g, 40 blocks; LAVIS uses the first 39)")
    b2.add_argument("--output", required=True, type=Path)
    b2.add_argument("--tokenizer", type=Path, default=None, help="bert-base-uncased folder (default: HF cache)")
    vqa = sub.add_parser("blip-vqa", help="original BLIP VQA checkpoint (480 px) -> VQA folder")
    vqa.add_argument("--checkpoint", required=True, type=Path)
    vqa.add_argument("--output", required=True, type=Path)
    vqa.add_argument("--tokenizer", type=Path, default=None, help="bert-base-uncased folder (default: HF cache)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.what == "blip2":
        from pipeline.models.convert_blip2 import convert_lavis_blip2

        out = convert_lavis_blip2(
            args.lavis_checkpoint, args.output, args.tokenizer, vision_checkpoint=args.vision_checkpoint
        )
    else:
        from pipeline.models.convert_blip_vqa import convert_blip_vqa

        out = convert_blip_vqa(args.checkpoint, args.output, args.tokenizer)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    run_main(main)
