"""`automix-fast visualize`: a PNG of Mix Block masks from a checkpoint (automix_fast.visualize
draws it); reads only the evaluation split."""
from __future__ import annotations

from pathlib import Path

from automix_fast.commands.common import EVAL_OVERRIDES, eval_data, load_trained
from automix_fast.errors import UserError
from automix_fast.rundir import check_writable
from automix_fast.visualize import next_free_path, write_mix_grid


def run(args) -> int:
    if args.num < 1:
        raise UserError(f"--num must be at least 1, got {args.num}")
    if args.png and Path(args.png).suffix.lower() != ".png":
        raise UserError(f"--output must end in .png (the picture is a PNG), got {Path(args.png).name}")
    overrides = {k: getattr(args, k) for k in EVAL_OVERRIDES if k in vars(args)}
    if "data_dir" in overrides:
        overrides["dataset"] = "auto"
    trained = load_trained(args.checkpoint, overrides)
    if trained.mixer.mix_block is None:
        raise UserError(f"{args.checkpoint} was trained with --mix {trained.cfg.mixing.mix}, which has no Mix Block "
                        "to visualize")
    # never replaces an earlier picture; checked before the work
    png = check_writable(args.png or next_free_path(Path(args.checkpoint).parent), "mask picture",
                         "choose a writable --output" if args.png else "pass a writable --output FILE.png")
    loader, info, spec = eval_data(trained)
    path, lines = write_mix_grid(trained.mixer, loader, png, spec, num=args.num, classes=info.classes)
    norms = {k: float(v) for k, v in trained.mixer.mix_block.weight_norms().items()}
    print("\n".join(lines))  # the mask statistics the training logs, on these pairs
    print(f"Mix Block weight norms: W_q {norms['mix_block_q_norm']:.4f}  W_v {norms['mix_block_v_norm']:.4f}")
    print(path)
    return 0
