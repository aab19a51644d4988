"""The `automix-fast` command: train, eval, visualize, models.

Mistakes in the user's input (flags, config files, data, checkpoints) print one line
starting with 'error:' and exit with status 2; nothing is printed as a traceback.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import fields

from automix_fast.config import CHOICES, TrainConfig
from automix_fast.errors import UserError

# Short or timm-style spellings of some fields.
ALIASES = {
    "batch_size": ["-b"],
    "workers": ["-j"],
    "validation_batch_size": ["-vb"],
}
HELP = {
    "data_dir": "dataset folder: ImageFolder train/ and val/, or CIFAR python batches; none: the embedded default",
    "mix": "mixing policy",
    "mix_alpha": "Beta(alpha, alpha) for lambda (default: mixup 1.0, cutmix 0.2, automix 2.0)",
    "encoder_momentum": "AutoMix momentum encoder: EMA momentum at the start (the cosine rise begins at 10%% of training)",
    "encoder_momentum_end": "EMA momentum at the end (default 0.999 for the short default run; recipes: 0.999999 CIFAR, 0.99999 ImageNet)",
    "mask_loss_weight": "weight of the Mix Block mask loss",
    "mask_loss_anneal": "mask loss weight over training: none, cosine to 0, or compound (the official hook, ImageNet recipes)",
    "sched_on_updates": "timm's: the LR cosine moves every step (default: once per epoch, as mmcv)",
    "k_full_forward": "k runs all its stages on the clean batch (official; BN statistics), not only to the mix stage",
    "mix_shuffle_no_repeat": "permutations without fixed points (official fine-grained recipes)",
    "decay_norm_and_bias": "weight decay on every parameter (official/mmcv) instead of timm's bias/norm exemption",
    "mix_block_momentum": "SGD momentum of the Mix Block's parameter group (default: --momentum)",
    "mask_margin": "mask loss margin around lambda",
    "lam_margin": "plain mixup instead of the Mix Block mask when min(lam, 1-lam) <= this",
    "lam_concat": "append lambda as a feature channel in the Mix Block (ImageNet recipes)",
    "kernel_backend": "Mix Block ops: Triton kernels, the torch reference, or auto (Triton on CUDA)",
    "loader": "data loader: DALI, torch, or auto (DALI when installed)",
    "output": "parent folder of run folders",
    "experiment": "run folder name under --output (default: date-model-mix)",
    "resume": "checkpoint path, or 'auto' for the newest valid checkpoint of --experiment",
    "amp": "mixed precision (default: on with CUDA)",
    "channels_last": "channels-last memory format (default: on with CUDA)",
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field; defaults are SUPPRESSed so only explicit flags override."""
    for f in fields(TrainConfig):
        base = str(f.type).replace(" | None", "")
        names = ALIASES.get(f.name, []) + [_flag(f.name)]
        kw = dict(dest=f.name, default=argparse.SUPPRESS, help=HELP.get(f.name, ""))
        if base == "bool":
            parser.add_argument(*names, action=argparse.BooleanOptionalAction, **kw)
            continue
        if base == "list":
            parser.add_argument(*names, type=int, nargs="+", **kw)
            continue
        kw["type"] = {"int": int, "float": float}.get(base, str)
        if f.name in CHOICES:
            kw["choices"] = CHOICES[f.name]
        parser.add_argument(*names, **kw)
    # timm's switches: --mixup ALPHA / --cutmix ALPHA pick the policy and its alpha.
    parser.add_argument("--mixup", type=float, default=argparse.SUPPRESS, metavar="ALPHA", help="shorthand for --mix mixup --mix-alpha ALPHA")
    parser.add_argument("--cutmix", type=float, default=argparse.SUPPRESS, metavar="ALPHA", help="shorthand for --mix cutmix --mix-alpha ALPHA")


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag value as one 'error: ...' line (no usage block), exit 2."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="automix-fast", description="AutoMix training engine")
    sub = parser.add_subparsers(dest="command", metavar="{train,eval,visualize,models}")
    train = sub.add_parser("train", help="train a classifier (default: AutoMix on the embedded dataset)")
    train.add_argument("-c", "--config", default=None, help="YAML config; explicit flags override it")
    add_config_flags(train)
    ev = sub.add_parser("eval", help="evaluate every head of a checkpoint")
    vis = sub.add_parser("visualize", help="write a PNG of Mix Block masks from a checkpoint")
    for p in (ev, vis):
        p.add_argument("--checkpoint", required=True, help="a .pt file written by automix-fast train")
        p.add_argument("--data-dir", default=argparse.SUPPRESS, help="dataset folder (default: the one it was trained on)")
        p.add_argument("--device", choices=CHOICES["device"], default=argparse.SUPPRESS)
        p.add_argument("--kernel-backend", dest="kernel_backend", choices=CHOICES["kernel_backend"], default=argparse.SUPPRESS)
        p.add_argument("--loader", choices=CHOICES["loader"], default=argparse.SUPPRESS)
        p.add_argument("-j", "--workers", type=int, default=argparse.SUPPRESS)
    ev.add_argument("-b", "--batch-size", dest="validation_batch_size", type=int, default=argparse.SUPPRESS)
    vis.add_argument("--output", dest="png", default=None,
                     help="PNG path (default: mixes.png beside the checkpoint, or mixes-1.png, mixes-2.png ... if taken)")
    vis.add_argument("--num", type=int, default=8, help="pairs to show")
    sub.add_parser("models", help="list the models")
    return parser


def train_config(args: argparse.Namespace) -> TrainConfig:
    from automix_fast.config import build_config, load_yaml

    overrides = {k: v for k, v in vars(args).items() if k not in ("command", "config", "mixup", "cutmix")}
    for policy in ("mixup", "cutmix"):
        if policy in vars(args):
            overrides.setdefault("mix", policy)
            overrides.setdefault("mix_alpha", getattr(args, policy))
    file_values = load_yaml(args.config) if args.config else {}
    return build_config(file_values, overrides)


def cmd_train(args) -> int:
    from automix_fast.engine.distributed import cleanup
    from automix_fast.engine.runner import Trainer

    try:
        summary = Trainer(train_config(args)).fit()
    finally:
        cleanup()  # leave the process group before exit: a live gloo group can abort at shutdown
    if not summary.get("stopped") and summary.get("is_main", True):
        _print_summary(summary)
    return 0


def _print_summary(summary: dict) -> None:
    ev = summary["eval"]
    print(f"\ndone: {summary['mix']} {summary['model']}, {summary['epochs']} epochs in {summary['train_seconds']:.0f}s")
    print(f"{'head':<8} {'top-1':>7} {'top-5':>7}")
    for head in summary["heads"]:
        print(f"{head:<8} {ev[head + '_top1']:>7.2f} {ev[head + '_top5']:>7.2f}")
    print(f"run folder: {summary['run_dir']}")
    if summary.get("mixes_png"):
        print(f"mixed samples: {summary['mixes_png']}")


def _trainer_from_checkpoint(args):
    """A Trainer rebuilt from the config stored in a checkpoint, with its weights loaded."""
    from automix_fast.config import build_config
    from automix_fast.engine.checkpoint import load_checkpoint
    from automix_fast.engine.runner import FORMAT, Trainer
    from automix_fast.errors import CheckpointError

    state = load_checkpoint(args.checkpoint)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{args.checkpoint} is not an automix-fast training checkpoint")
    stored = dict(state["config"])
    for key in ("data_dir", "device", "kernel_backend", "loader", "workers", "validation_batch_size"):
        if key in vars(args):
            stored[key] = getattr(args, key)
    stored.update(resume=None, torchcompile=False)
    trainer = Trainer(build_config(stored), quiet=True)
    try:
        trainer.mixer.load_state_dict(state["mixer"])
    except RuntimeError as e:
        raise CheckpointError(f"{args.checkpoint} does not match its model: {str(e).splitlines()[0]}") from None
    return trainer


def cmd_eval(args) -> int:
    from automix_fast.engine.train import evaluate

    t = _trainer_from_checkpoint(args)
    ev = evaluate(t.mixer, t.val_loader, amp_dtype=t.amp_dtype, device=t.device)
    print(f"{args.checkpoint}: {ev['count']} validation images")
    print(f"{'head':<8} {'top-1':>7} {'top-5':>7}")
    for head in t.mixer.eval_heads():
        print(f"{head:<8} {ev[head + '_top1']:>7.2f} {ev[head + '_top5']:>7.2f}")
    return 0


def cmd_visualize(args) -> int:
    from pathlib import Path

    from automix_fast.visualize import next_free_path, write_mix_grid

    t = _trainer_from_checkpoint(args)
    if not hasattr(t.mixer, "mix_block"):
        raise UserError(f"{args.checkpoint} was trained with --mix {t.cfg.mix}, which has no Mix Block to visualize")
    if args.num < 1:
        raise UserError(f"--num must be at least 1, got {args.num}")
    png = args.png or next_free_path(Path(args.checkpoint).parent)  # never replaces an earlier picture
    path, lines = write_mix_grid(t.mixer, t.val_loader, png, t.spec, num=args.num, classes=t.info.classes)
    norms = {k: float(v) for k, v in t.mixer.mix_block.weight_norms().items()}
    print("\n".join(lines))  # the mask statistics the training logs, on these pairs
    print(f"Mix Block weight norms: W_q {norms['mix_block_q_norm']:.4f}  W_v {norms['mix_block_v_norm']:.4f}")
    print(path)
    return 0


def cmd_models(args) -> int:
    from automix_fast.models import list_models, model_summary

    for name in list_models():
        print(model_summary(name))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv or ["train"])
    if args.command is None:
        args = parser.parse_args(["train"] + argv)
    commands = {"train": cmd_train, "eval": cmd_eval, "visualize": cmd_visualize, "models": cmd_models}
    try:
        return commands[args.command](args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `automix-fast models | head`: the reader left, which is not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
