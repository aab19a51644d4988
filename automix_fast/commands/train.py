"""`automix-fast train`: resolve the config (defaults < -c file < flags, or the stored config of
the run being resumed), run the Trainer, print the summary.

Exit status: 0 when the run finished (or was already finished: one line says so and how to
extend it, and nothing is trained; a summary.json that a kill or a failed write left missing
is written from the checkpoint); 128 + the signal number when SIGINT (130) or SIGTERM (143)
stopped it, after its checkpoint was written; 2 for a mistake in the input."""
from __future__ import annotations

import argparse
import os
import signal

from automix_fast import rundir
from automix_fast.config import CONFIG_DIR, build_config, file_under_flags, idle_flags, load_yaml, resumed_config
from automix_fast.data.layout import KIND_NAMES, LayoutError
from automix_fast.engine.distributed import cleanup
from automix_fast.engine.metrics import elapsed_text
from automix_fast.engine.runner import Trainer
from automix_fast.errors import DataError

# Parser entries that are not TrainConfig fields.
NOT_FIELDS = ("command", "config")


def given_values(args: argparse.Namespace) -> tuple[dict, dict]:
    """(values from the -c file, values of the flags typed): only what the user gave."""
    flags = given_values_typed(args)
    file_values = load_yaml(args.config) if getattr(args, "config", None) else {}
    return file_values, flags


def given_values_typed(args: argparse.Namespace) -> dict:
    """The fields whose flags were typed on the command line, with their values."""
    return {k: v for k, v in vars(args).items() if k not in NOT_FIELDS}


def train_config(args: argparse.Namespace):
    """(TrainConfig, resume_from): with --resume and a checkpoint to continue from, the run's
    stored config with the given values of the fields that may change on resume."""
    file_values, flags = given_values(args)
    cfg = build_config(file_values, flags)  # checks every given value, and --resume auto needs --experiment
    if not cfg.run.resume:
        return cfg, None
    found = rundir.find_resume(cfg)
    if found is None:
        return cfg, None
    # The file's values that apply under the flags, as build_config took them (the mixing policy is the flags')
    return resumed_config(found, {**file_under_flags(file_values, flags), **flags}), found


def run(args) -> int:
    try:
        cfg, resume_from = train_config(args)
        finished = resume_from is not None and rundir.finished_line(resume_from, cfg)
        if finished:
            if os.environ.get("RANK", "0") == "0":
                print(finished)
                for line in rundir.finish_again(resume_from, cfg):  # a missing summary.json, killed writes' temp files
                    print(line)
            return 0
        try:
            summary = Trainer(cfg, resume_from=resume_from, resolved=True,
                              warning=idle_flags(cfg, given_values_typed(args))).fit()
        except LayoutError as e:
            if resume_from is None:
                explain_pinned_dataset(e, args)
            raise
    finally:
        cleanup()  # leave the process group before exit: a live gloo group can abort at shutdown
    if not summary.get("stopped") and summary.get("is_main", True):
        print_summary(summary)
    if summary.get("stopped") or summary.get("signal"):
        # A rank stopped by another rank's signal (under torchrun) exits as for SIGTERM.
        return 128 + (summary.get("signal") or signal.SIGTERM)
    return 0


def explain_pinned_dataset(err, args: argparse.Namespace) -> None:
    """`err`: a data.layout.LayoutError. When the -c file (not a flag) set `dataset:` and the data is another kind, raise the error
    again naming the config, its value and the flags (or the shipped config) that fit the data."""
    name = getattr(args, "config", None)
    if not name or "dataset" in vars(args):
        return
    pinned = load_yaml(name)
    if pinned.get("dataset") in (None, "auto"):
        return
    config = os.path.splitext(os.path.basename(name))[0]
    advice = ""
    if err.found in KIND_NAMES:
        flags = f"--dataset {err.found}"
        if "num_classes" in pinned:
            flags += {"cifar10": " --num-classes 10", "cifar100": " --num-classes 100"}.get(err.found, " --num-classes N")
        advice = f"; pass {flags} to train it on {KIND_NAMES[err.found]}"
        kin = config.replace(pinned["dataset"], err.found, 1) if config.startswith(pinned["dataset"] + "_") else None
        if kin and os.path.isfile(os.path.join(CONFIG_DIR, kin + ".yaml")):
            advice += f", or use -c {kin}"
    raise DataError(f"{err}; the config {config} sets dataset: {pinned['dataset']}{advice}") from None


def print_summary(summary: dict) -> None:
    ev = summary["eval"]
    epochs = summary["epochs"]
    print(f"\ndone: {summary['mix']} {summary['model']}, {epochs} epoch{'s' if epochs != 1 else ''} "
          f"in {elapsed_text(summary['train_seconds'])}"
          + (f" ({elapsed_text(summary['compile_seconds'])} of it compiling)" if "compile_seconds" in summary else ""))
    print(f"{'head':<8} {'top-1':>7} {'top-5':>7}")
    for head in summary["heads"]:
        print(f"{head:<8} {ev[head + '_top1']:>7.2f} {ev[head + '_top5']:>7.2f}")
    print(f"run folder: {summary['run_dir']}")
    if summary.get("mixes_png"):
        print(f"mixed samples: {summary['mixes_png']}")
