"""`automix-fast visualize`: a PNG of Mix Block masks from a checkpoint (automix_fast.visualize
draws it); reads only the evaluation split."""
from __future__ import annotations

from pathlib import Path

from automix_fast.commands.common import EVAL_OVERRIDES, eval_data, load_trained
from automix_fast.errors import UserError


def run(args) -> int:
    from automix_fast.visualize import write_mix_grid

    if args.num < 1:
        raise UserError(f"--num must be at least 1, got {args.num}")
    overrides = {k: getattr(args, k) for k in EVAL_OVERRIDES if k in vars(args)}
    if "data_dir" in overrides:
        overrides["dataset"] = "auto"
    trained = load_trained(args.checkpoint, overrides)
    if not hasattr(trained.mixer, "mix_block"):
        raise UserError(f"{args.checkpoint} was trained with --mix {trained.cfg.mix}, which has no Mix Block to visualize")
    loader, _, spec = eval_data(trained)
    png = args.png or str(Path(args.checkpoint).with_name("mixes.png"))
    print(write_mix_grid(trained.mixer, loader, png, spec, num=args.num))
    return 0
