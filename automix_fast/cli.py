"""The `automix-fast` command: builds the parser and dispatches to automix_fast.commands.

Mistakes in the user's input (flags, config files, data, checkpoints, unwritable outputs)
print one line starting with 'error:' and exit with status 2; nothing is printed as a
traceback. Flags must be spelled out: abbreviations (`--epoch`) are refused, so a typo can
never set another field. No command, or flags alone (`automix-fast --epochs 1`), is `train`.
"""
from __future__ import annotations

import argparse
import difflib
import os
import shlex
import sys
from dataclasses import fields

from automix_fast.commands import eval as eval_cmd
from automix_fast.commands import export, models, train, visualize
from automix_fast.config import CHOICES, SECTIONS, flag_name
from automix_fast.errors import UserError


def _default_text(f) -> str:
    if f.default is None:
        return "none"
    if isinstance(f.default, bool):
        return "on" if f.default else "off"
    return str(f.default)


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field, in one group per section, from the field's metadata
    (automix_fast.config.fields.option); defaults are SUPPRESSed so only explicit flags
    override (the help shows the built-in default)."""
    for section in SECTIONS:
        group = parser.add_argument_group(section.name)
        for f in fields(section.type_):
            meta = f.metadata
            base = str(f.type).replace(" | None", "")
            names = list(meta["aliases"]) + [flag_name(f.name)]
            kw = dict(dest=f.name, default=argparse.SUPPRESS, help=f"{meta['help']} (default: {_default_text(f)})")
            if meta["const"] is not None:  # `--torchcompile [BACKEND]` and `--no-torchcompile`
                value, metavar = meta["const"]
                group.add_argument(*names, nargs="?", const=value, metavar=metavar, **kw)
                group.add_argument("--no-" + flag_name(f.name)[2:], dest=f.name, action="store_const", const=False,
                                   default=argparse.SUPPRESS,
                                   help=f"turn {flag_name(f.name)} off (the default; overrides a config file)")
            elif base == "bool":
                group.add_argument(*names, action=argparse.BooleanOptionalAction, **kw)
            elif base == "list":
                item, nargs, metavar = meta["items"]
                group.add_argument(*names, type=item, nargs=nargs, metavar=metavar, **kw)
            else:
                group.add_argument(*names, type={"int": int, "float": float}.get(base, str), choices=meta["choices"],
                                   **kw)


# Spelled-out names people type for our flags; a misspelling of one is matched too.
SYNONYMS = {"--learning-rate": "--lr", "--min-learning-rate": "--min-lr", "--lr-min": "--min-lr",
            "--batch": "--batch-size", "--wd": "--weight-decay", "--warmup": "--warmup-epochs",
            "--data": "--data-dir", "--data-path": "--data-dir"}


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
        close to one of this parser's (difflib ratio >= 0.75, '_' read as '-'), or, for a folder
        given alone (timm's and NVIDIA's scripts take the data folder as a positional DIR), the
        --data-dir to type."""
        message = f"unrecognized arguments: {' '.join(extras)}"
        known = [o for a in self._actions for o in a.option_strings]
        flag = next((a for a in extras if a.startswith("-")), None)
        if not extras[0].startswith("-") and os.path.isdir(extras[0]) and "--data-dir" in known:
            return message + f"; the data folder is given with --data-dir {shlex.quote(extras[0])}"
        if flag is None:
            return message
        typed = flag.split("=", 1)[0].replace("_", "-")
        candidates = known + [s for s in SYNONYMS if SYNONYMS[s] in known]
        close = difflib.get_close_matches(typed, candidates, n=1, cutoff=0.75)
        if close:
            message += f"; did you mean {SYNONYMS.get(close[0], close[0])}?"
        return message


def _add_eval_data_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="a .pt file written by automix-fast train (required)")
    p.add_argument("--data-dir", default=argparse.SUPPRESS,
                   help="dataset root, a folder holding val/, a flat ImageFolder, or CIFAR python batches (their test "
                        "batch) (default: the one it was trained on)")
    p.add_argument("--device", choices=CHOICES["device"], default=argparse.SUPPRESS, help="default: as trained")
    p.add_argument("--kernel-backend", dest="kernel_backend", choices=CHOICES["kernel_backend"],
                   default=argparse.SUPPRESS, help="Mix Block ops (default: as trained)")
    p.add_argument("--loader", choices=CHOICES["loader"], default=argparse.SUPPRESS, help="data loader (default: as trained)")
    p.add_argument("-j", "--workers", type=int, default=argparse.SUPPRESS, help="loader workers (default: as trained)")
    p.add_argument("--skip-bad-images", dest="skip_bad_images", action=argparse.BooleanOptionalAction,
                   default=argparse.SUPPRESS,
                   help="leave out the image files the pre-check finds damaged instead of refusing (default: as trained)")


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
                         "FILE.pt or FILE.pth; its JSON (e.g. FILE.pt2.json) is written beside it "
                         "(default: <checkpoint>-<head>.safetensors beside the checkpoint)")

    vis = sub.add_parser("visualize", help="write a PNG of Mix Block masks from a checkpoint")
    _add_eval_data_flags(vis)
    vis.add_argument("--output", dest="png", default=None,
                     help="PNG path, ending in .png (default: mixes.png beside the checkpoint, or mixes-1.png, "
                          "mixes-2.png ... once it exists: an earlier picture is never replaced)")
    vis.add_argument("--num", type=int, default=8, help="pairs to show (default: 8)")
    sub.add_parser("models", help="list the models")
    return parser


def _commands() -> dict:
    return {"train": train.run, "eval": eval_cmd.run, "export": export.run, "visualize": visualize.run,
            "models": models.run}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["train"] + argv  # flags alone (or nothing) are train's
    args = parser.parse_args(argv)
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
