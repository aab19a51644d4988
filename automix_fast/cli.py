"""The `automix-fast` command: builds the parser and dispatches to automix_fast.commands.

Mistakes in the user's input (flags, config files, data, checkpoints, unwritable outputs)
print one line starting with 'error:' and exit with status 2; nothing is printed as a
traceback. Flags must be spelled out: abbreviations (`--epoch`) are refused, so a typo can
never set another field.
"""
from __future__ import annotations

import argparse
import difflib
import os
import sys
from dataclasses import MISSING, fields

from automix_fast.config import CHOICES, LIST_ITEMS, TIMM_HELP, TrainConfig, flag_name
from automix_fast.errors import UserError

# Short or timm-style spellings of some fields.
ALIASES = {
    "batch_size": ["-b"],
    "workers": ["-j"],
    "validation_batch_size": ["-vb"],
}
# Every TrainConfig field has a line here (a test checks); `--help` adds the default.
HELP = {
    "data_dir": "dataset folder: ImageFolder train/ and val/ (or test/), train/ alone or DIR/<class>/ with --val-split, "
                "or CIFAR python batches; none: the embedded default",
    "dataset": "what --data-dir holds; auto: detected",
    "loader": "data loader: DALI, torch, or auto (DALI when installed)",
    "workers": "loader worker processes/threads per process",
    "img_size": "training image size in pixels; none: the model's default",
    "aug": "augmentation: cifar (pad-crop-flip), imagenet (random-resized-crop), auto (cifar up to 64 px)",
    "skip_bad_images": "leave out unreadable image files (with a warning) instead of stopping",
    "num_classes": "expected class count; none: from the data (a mismatch is an error)",
    "val_split": "hold out this class-balanced fraction of a folder without val/ (DIR/train/ alone or DIR/<class>/) "
                 "for validation; the same images on every run",
    "model": "network (see `automix-fast models`)",
    "epochs": "epochs to train (may be raised when resuming)",
    "batch_size": "images per batch per process",
    "validation_batch_size": "images per eval batch; none: twice --batch-size",
    "opt": "optimizer",
    "lr": "peak learning rate (for the batch size given; scale it yourself with the global batch)",
    "min_lr": "learning rate floor of the cosine schedule",
    "momentum": "SGD momentum",
    "weight_decay": "weight decay (not on biases and norm weights)",
    "sched": "learning-rate schedule after the warmup; the cosine moves once per epoch (every step with "
             "--sched-on-updates), step divides at --decay-epochs, the warmup moves every step",
    "decay_epochs": "epochs at which --sched step divides the lr by 10",
    "warmup_epochs": "linear warmup length in epochs (fractions allowed); none: 1, at most a quarter of --epochs "
                     "(a line says so when that cap applies; a value given is kept)",
    "warmup_lr": "learning rate at the start of warmup",
    "smoothing": "label smoothing",
    "mix": "mixing policy",
    "mix_alpha": "Beta(alpha, alpha) for lambda; none: mixup 1.0, cutmix 0.2, automix 2.0",
    "encoder_momentum": "AutoMix momentum encoder: EMA momentum at the start (the cosine rise begins at 10%% of training)",
    "encoder_momentum_end": "EMA momentum at the end (recipes: 0.999999 CIFAR, 0.99999 ImageNet)",
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
    "mask_mode": "Mix Block mask upsampling",
    "mix_stage": "backbone stage whose features feed the Mix Block; none: the model's (3 for ResNets)",
    "mix_block_lr": "Mix Block learning rate; none: --lr",
    "mix_block_min_lr": "Mix Block learning-rate floor; none: --min-lr",
    "mix_block_weight_decay": "Mix Block weight decay; none: --weight-decay",
    "kernel_backend": "Mix Block ops: Triton kernels, the torch reference, or auto (Triton on CUDA)",
    "device": "where to train; auto: CUDA when available",
    "amp": "mixed precision; none: on with CUDA",
    "amp_dtype": "mixed-precision dtype (float16 adds a GradScaler)",
    "channels_last": "channels-last memory format; none: on with CUDA",
    "torchcompile": "torch.compile the encoders",
    "sync_bn": "synchronise BatchNorm statistics across processes (torchrun)",
    "deterministic": "deterministic algorithms (slower)",
    "max_bad_steps": "stop after this many consecutive steps with a NaN/inf loss or gradient",
    "seed": "random seed (weights, lambdas, permutations, data order)",
    "output": "parent folder of run folders",
    "experiment": "run folder name under --output; none: <date>-<time>-<model>-<mix> (a new name, never a used one)",
    "resume": "continue a run: 'auto' (the newest valid checkpoint of --experiment; none yet: a fresh start), "
              "a checkpoint file, or a run folder (path or name under --output: its newest valid checkpoint); "
              "its stored config is used, flags may change only --epochs, --workers, --log-interval and other run settings",
    "allow_config_change": "with --resume: accept flags that change what the run computes",
    "checkpoint_hist": "epoch checkpoints to keep (the newest); last.pt and best.pt are links to them, not copies",
    "log_interval": "steps between progress lines and metrics.jsonl records",
    "visualize": "write mixes.png (AutoMix) at the end of training",
}
HELP.update(TIMM_HELP)
HELP.update({
    "train_subset": "train on this class-balanced fraction of the training set (e.g. 0.1; validation stays whole)",
    "train_subset_seed": "seed of the --train-subset draw (fixed apart from --seed, so seeds share the subset)",
    "mix_block_init": "Mix Block attention start: official N(0, 0.01) W_q, scaled (W_q ~ N(0, 1/C)), "
                      "cosine (normalised q, k with a learnable temperature from 10), or cosine-centered "
                      "(q, k centred over each image's positions first); see docs/QUALITY.md",
    "mix_block_every": "update the Mix Block every N-th step; the others use its masks without gradient "
                       "and skip x_mb and k's pass on it (AutoMix)",
    "eval_interval": "evaluate after every N-th epoch and after the last (best.pt then compares those epochs only)",
})


def _default_text(f) -> str:
    default = f.default if f.default is not MISSING else None
    if default is None:
        return "none"
    if isinstance(default, bool):
        return "on" if default else "off"
    return str(default)


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field; defaults are SUPPRESSed so only explicit flags override
    (the help shows the built-in default)."""
    for f in fields(TrainConfig):
        base = str(f.type).replace(" | None", "")
        names = ALIASES.get(f.name, []) + [flag_name(f.name)]
        help_text = f"{HELP.get(f.name, '')} (default: {_default_text(f)})"
        kw = dict(dest=f.name, default=argparse.SUPPRESS, help=help_text)
        if base == "bool":
            parser.add_argument(*names, action=argparse.BooleanOptionalAction, **kw)
            continue
        if base == "list":
            item, nargs, metavar = LIST_ITEMS.get(f.name, (int, "+", None))
            parser.add_argument(*names, type=item, nargs=nargs, metavar=metavar, **kw)
            continue
        kw["type"] = {"int": int, "float": float}.get(base, str)
        if f.name in CHOICES:
            kw["choices"] = CHOICES[f.name]
        parser.add_argument(*names, **kw)


# Spelled-out names people type for our flags; a misspelling of one is matched too.
SYNONYMS = {"--learning-rate": "--lr", "--min-learning-rate": "--min-lr", "--lr-min": "--min-lr",
            "--batch": "--batch-size", "--wd": "--weight-decay", "--warmup": "--warmup-epochs"}


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag value as one 'error: ...' line (no usage block), exit 2,
    and never accepts an abbreviated long flag. An unknown flag is reported by the subcommand it
    was given to, which points to its own --help and names the closest flag it has."""

    def __init__(self, *args, **kwargs):
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")

    def parse_args(self, args=None, namespace=None):
        ns, extras = self.parse_known_args(args, namespace)
        if extras:
            subs = [a for a in self._actions if isinstance(a, argparse._SubParsersAction)]
            owner = subs[0].choices.get(getattr(ns, "command", None), self) if subs else self
            owner.error(owner.unrecognized(extras))
        return ns

    def unrecognized(self, extras: list[str]) -> str:
        """'unrecognized arguments: ...', with '; did you mean --X?' when the first unknown flag is
        close to one of this parser's (difflib ratio >= 0.75, '_' read as '-')."""
        message = f"unrecognized arguments: {' '.join(extras)}"
        flag = next((a for a in extras if a.startswith("-")), None)
        if flag is None:
            return message
        typed = flag.split("=", 1)[0].replace("_", "-")
        known = [o for a in self._actions for o in a.option_strings]
        candidates = known + [s for s in SYNONYMS if SYNONYMS[s] in known]
        close = difflib.get_close_matches(typed, candidates, n=1, cutoff=0.75)
        if close:
            message += f"; did you mean {SYNONYMS.get(close[0], close[0])}?"
        return message


def _add_eval_data_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="a .pt file written by automix-fast train (required)")
    p.add_argument("--data-dir", default=argparse.SUPPRESS,
                   help="dataset root, a folder holding val/, or a flat ImageFolder (default: the one it was trained on)")
    p.add_argument("--device", choices=CHOICES["device"], default=argparse.SUPPRESS, help="default: as trained")
    p.add_argument("--kernel-backend", dest="kernel_backend", choices=CHOICES["kernel_backend"],
                   default=argparse.SUPPRESS, help="Mix Block ops (default: as trained)")
    p.add_argument("--loader", choices=CHOICES["loader"], default=argparse.SUPPRESS, help="data loader (default: as trained)")
    p.add_argument("-j", "--workers", type=int, default=argparse.SUPPRESS, help="loader workers (default: as trained)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="automix-fast", description="AutoMix training engine")
    sub = parser.add_subparsers(dest="command", metavar="{train,eval,export,visualize,models}", parser_class=_Parser)
    train = sub.add_parser("train", help="train a classifier (default: AutoMix on the embedded dataset)")
    train.add_argument("-c", "--config", default=None,
                       help="YAML config or shipped config name; explicit flags override it (default: none)")
    add_config_flags(train)

    ev = sub.add_parser("eval", help="evaluate every head of a checkpoint: top-1/top-5, per-class accuracy, confusion")
    _add_eval_data_flags(ev)
    ev.add_argument("-b", "--batch-size", dest="validation_batch_size", type=int, default=argparse.SUPPRESS,
                    help="images per batch (default: as trained)")
    ev.add_argument("--output", default=None,
                    help="JSON file for the results (default: eval-<checkpoint>.json in the run folder, never overwritten)")

    ex = sub.add_parser("export", help="write one encoder and head of a checkpoint as a program (.pt2/.onnx) or weights (.safetensors/.pt), + .json")
    ex.add_argument("--checkpoint", required=True, help="a .pt file written by automix-fast train (required)")
    ex.add_argument("--head", choices=("q", "k"), default="q",
                    help="encoder: q (online) or k (AutoMix's momentum encoder) (default: q)")
    ex.add_argument("--classifier", choices=("one", "mix"), default="one",
                    help="head exported as fc: one (plain labels) or mix (AutoMix's mixed-label head) (default: one)")
    ex.add_argument("--output", default=None,
                    help="FILE.pt2 (torch.export program, needs only torch), FILE.onnx, or weights FILE.safetensors, "
                         "FILE.pt or FILE.pth; FILE.json is written beside it "
                         "(default: <checkpoint>-<head>.safetensors beside the checkpoint)")

    vis = sub.add_parser("visualize", help="write a PNG of Mix Block masks from a checkpoint")
    _add_eval_data_flags(vis)
    vis.add_argument("--output", dest="png", default=None, help="PNG path (default: mixes.png beside the checkpoint)")
    vis.add_argument("--num", type=int, default=8, help="pairs to show (default: 8)")
    sub.add_parser("models", help="list the models")
    return parser


def _commands() -> dict:
    from automix_fast.commands import eval as eval_cmd
    from automix_fast.commands import export, models, train, visualize

    return {"train": train.run, "eval": eval_cmd.run, "export": export.run, "visualize": visualize.run,
            "models": models.run}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv or ["train"])
    if args.command is None:
        args = parser.parse_args(["train"] + argv)
    try:
        return _commands()[args.command](args)
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
