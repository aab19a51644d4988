"""The quality study (docs/QUALITY.md): what AutoMix buys on the CIFAR-10 JPEGs.

    python bench/quality_study.py --data-dir DATA/cifar10 --list               # the plan, with what is done
    python bench/quality_study.py --data-dir DATA/cifar10                      # run / resume everything
    python bench/quality_study.py --data-dir DATA/cifar10 --only sub10-vanilla-s0 --stop-at 18:00
    python bench/quality_study.py --report                                     # tables and PNGs only

One training at a time (`automix-fast train` in a child process with OMP_NUM_THREADS = --threads,
default 2, the cores: two at once on 2 cores run ~10x slower each). Each run is one experiment
folder under --runs (default output/quality/) and, once finished, one JSON under --results
(default bench/results/quality/). A run with a JSON is skipped; one with a checkpoint is resumed
(`--resume auto --experiment ID`), so the command can be stopped and started again at will:
Ctrl-C or SIGTERM (or --stop-at HH:MM, UTC) asks the training to checkpoint and stop. After
each finished run the tables in --results/TABLE.md, and in docs/QUALITY.md between its
markers, are rewritten, and AutoMix runs' mask pictures are copied to docs/quality/.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, environment  # noqa: E402
from quality_report import run_record, tables  # noqa: E402

# The recipe every run shares (batch 100, lr 0.1 cosine, wd 5e-4, 1 warm-up epoch): the official
# AutoMix CIFAR recipe's batch and lr, on He et al.'s ResNet-20.
RECIPE = ["--model", "resnet20_cifar", "-b", "100", "--lr", "0.1", "--weight-decay", "5e-4", "--sched", "cosine",
          "--warmup-epochs", "1", "--loader", "dali", "--workers", "2", "--log-interval", "25"]

POLICIES = {
    "vanilla": ["--mix", "vanilla"],
    "mixup": ["--mix", "mixup", "--mix-alpha", "1"],
    "cutmix0.2": ["--mix", "cutmix", "--mix-alpha", "0.2"],
    "cutmix1": ["--mix", "cutmix", "--mix-alpha", "1"],
    "automix": ["--mix", "automix"],
    "automix-scaled": ["--mix", "automix", "--mix-block-init", "scaled"],
    "automix-cosine": ["--mix", "automix", "--mix-block-init", "cosine"],
    "automix-nowd": ["--mix", "automix", "--mix-block-weight-decay", "0"],
    "automix-centered": ["--mix", "automix", "--mix-block-init", "cosine-centered"],
    "automix-every2": ["--mix", "automix", "--mix-block-every", "2"],
}

# Regimes: (extra flags, epochs, evaluate every N epochs). sub10: 10% of the training set
# (500 images a class), where a 0.27M-parameter net can overfit; full: all 50,000 images.
REGIMES = {
    "probe": (["--train-subset", "0.1"], 3, 3),  # the saddle probe: 150 steps, masks only
    "sub10": (["--train-subset", "0.1"], 30, 5),
    "full": ([], 3, 3),
}
# AutoMix's wall time per epoch over a baseline's, measured (docs/QUALITY.md): the equal-time
# baselines train this many times the epochs.
EQUAL_TIME_FACTOR = 3

PLANS = {
    # Off the saddle, first: which Mix Block setting makes spatial masks in the budget (~1 min a
    # run on a free machine; seed 0 first, which is what chose the study's candidate).
    "saddle": [("probe", p, s, 1) for s in (0, 1)
               for p in ("automix", "automix-scaled", "automix-cosine", "automix-nowd")],
    # The study proper, one seed after the other (each ~2 h on 2 cores, docs/QUALITY.md): the
    # overfitting regime with every policy, its equal-time baselines, then the full-data regime
    # with the main policies. Most informative first, so an interrupted seed still says something.
    "study": [entry for s in (0, 1) for entry in (
        [("sub10", p, s, 1) for p in ("vanilla", "automix", "automix-cosine", "mixup", "cutmix1", "cutmix0.2",
                                       "automix-every2", "automix-centered")]
        + [("sub10", p, s, EQUAL_TIME_FACTOR) for p in ("vanilla", "mixup", "cutmix1")]
        + [("full", p, s, 1) for p in ("vanilla", "mixup", "cutmix1", "automix", "automix-cosine")])],
    # AutoMix given the equal-time baselines' epochs (3x their compute): what it buys when the
    # budget is not the limit, in the regime where vanilla overfits.
    "long": [("sub10", "automix", s, EQUAL_TIME_FACTOR, "long") for s in (0, 1)],
}

DOCS = ROOT / "docs" / "QUALITY.md"
PNG_DIR = ROOT / "docs" / "quality"
TABLE_BEGIN, TABLE_END = "<!-- quality-study tables: begin -->", "<!-- quality-study tables: end -->"


def run_spec(regime: str, policy: str, seed: int, epoch_factor: int, tag: str | None = None) -> dict:
    """One run: the regime's epochs times `epoch_factor`. A longer run is tagged: `eqtime` (the
    default) for a baseline given AutoMix's time, `long` for AutoMix given the baselines' epochs."""
    flags, epochs, eval_interval = REGIMES[regime]
    tag = tag or ("eqtime" if epoch_factor > 1 else None)
    rid = f"{regime}-{policy}{f'-{tag}' if tag else ''}-s{seed}"
    epochs *= epoch_factor
    argv = [*RECIPE, *flags, *POLICIES[policy], "--seed", str(seed), "--epochs", str(epochs),
            "--eval-interval", str(eval_interval * epoch_factor)]
    return {"id": rid, "regime": regime, "policy": policy + (f"@{tag}" if tag else ""), "seed": seed,
            "epochs": epochs, "argv": argv}


def plan(names: list[str]) -> list[dict]:
    seen, runs = set(), []
    for name in names:
        for entry in PLANS[name]:
            spec = run_spec(*entry)
            if spec["id"] not in seen:
                seen.add(spec["id"])
                runs.append(spec)
    return runs


class Stopper:
    """Ctrl-C / SIGTERM / --stop-at: pass SIGINT on to the training (it checkpoints), start nothing new."""

    def __init__(self, stop_at: dt.datetime | None):
        self.stop_at, self.requested, self.child = stop_at, False, None
        self.previous = {s: signal.signal(s, self._signal) for s in (signal.SIGINT, signal.SIGTERM)}

    def restore(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def _signal(self, signum, _frame):
        self.requested = True
        if self.child is not None and self.child.poll() is None and signum != signal.SIGINT:
            self.child.send_signal(signal.SIGINT)  # Ctrl-C already reached the child's process group

    def due(self) -> bool:
        if self.stop_at is not None and dt.datetime.now(dt.timezone.utc) >= self.stop_at:
            if not self.requested and self.child is not None and self.child.poll() is None:
                self.child.send_signal(signal.SIGINT)
            self.requested = True
        return self.requested


def train(run: dict, args, stopper: Stopper) -> bool:
    """Run or resume one training; True when it finished (summary.json written)."""
    run_dir = args.runs / run["id"]
    if run_dir.is_dir() and not any(run_dir.glob("*.pt")):
        shutil.rmtree(run_dir)  # started but never checkpointed: nothing to resume, and train refuses a used folder
    argv = [sys.executable, "-m", "automix_fast", "train", "--data-dir", args.data_dir, *run["argv"],
            "--output", str(args.runs), "--experiment", run["id"], "--resume", "auto"]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    print(f"== {run['id']}: {' '.join(argv[3:])}", flush=True)
    wall_file = run_dir / "study_wall.json"
    t0 = time.perf_counter()
    stopper.child = subprocess.Popen(argv, env=env)
    while stopper.child.poll() is None:
        stopper.due()
        time.sleep(2)
    code = stopper.child.returncode
    walls = json.loads(wall_file.read_text()) if wall_file.exists() else []
    if run_dir.is_dir():
        wall_file.write_text(json.dumps(walls + [time.perf_counter() - t0]))
    finished = code == 0 and (run_dir / "summary.json").exists() and not json.loads(
        (run_dir / "summary.json").read_text()).get("stopped")
    if code != 0 and not stopper.requested:
        print(f"== {run['id']} failed (exit {code}); its checkpoint, if any, stays for a resume", flush=True)
    return finished


def record(run: dict, args) -> None:
    run_dir = args.runs / run["id"]
    wall = sum(json.loads((run_dir / "study_wall.json").read_text()))
    import torch

    rec = run_record(run, run_dir, wall, environment(torch.device("cpu")) | {"threads": args.threads})
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / f"{run['id']}.json").write_text(json.dumps(rec, indent=1) + "\n")
    png = run_dir / "mixes.png"
    if png.exists():
        args.png_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(png, args.png_dir / f"{run['id']}-masks.png")


def report(args) -> str:
    records = [json.loads(p.read_text()) for p in sorted(args.results.glob("*.json"))] if args.results.is_dir() else []
    text = tables(records)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "TABLE.md").write_text(text)
    if args.docs.exists():
        doc = args.docs.read_text()
        if TABLE_BEGIN in doc and TABLE_END in doc:
            head, rest = doc.split(TABLE_BEGIN, 1)
            args.docs.write_text(head + TABLE_BEGIN + "\n" + text + "\n" + TABLE_END + rest.split(TABLE_END, 1)[1])
    return text


def parse_stop_at(text: str, now: dt.datetime) -> dt.datetime:
    """HH:MM (UTC) -> the next such moment: `--stop-at 01:00` given at 23:00 means in two hours.
    The minute now counts as due, so a stop asked for the current minute stops at once."""
    try:
        hh, mm = (int(part) for part in text.split(":"))
        at = now.replace(hour=hh, minute=mm, second=0, microsecond=0)
    except ValueError:
        raise ValueError(f"--stop-at {text!r} is not a time of day HH:MM (UTC)") from None
    return at + dt.timedelta(days=1) if at + dt.timedelta(minutes=1) <= now else at


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("--data-dir", help="the CIFAR-10 JPEG folder (train/, test/)")
    p.add_argument("--plan", nargs="+", default=["saddle", "study"], choices=sorted(PLANS), help="plans to run, in order")
    p.add_argument("--only", nargs="+", default=None, help="run ids to run, in this order (see --list)")
    p.add_argument("--runs", type=Path, default=Path("output") / "quality", help="experiment folders")
    p.add_argument("--results", type=Path, default=ROOT / "bench" / "results" / "quality", help="one JSON per finished run")
    p.add_argument("--docs", type=Path, default=DOCS, help="markdown file whose table markers get the tables")
    p.add_argument("--png-dir", type=Path, default=PNG_DIR, help="where AutoMix runs' mask pictures are copied")
    p.add_argument("--threads", type=int, default=2, help="torch threads: the machine's cores")
    p.add_argument("--stop-at", default=None, help="HH:MM UTC, the next such moment: checkpoint the running training and stop then")
    p.add_argument("--list", action="store_true", help="print the plan and what is done, run nothing")
    p.add_argument("--report", action="store_true", help="only rewrite the tables from the kept JSON")
    args = p.parse_args(argv)
    if not (args.list or args.report) and not args.data_dir:
        p.error("--data-dir is required to train")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    runs = plan(args.plan)
    if args.only:
        unknown = sorted(set(args.only) - {r["id"] for r in runs})
        if unknown:
            print(f"error: not in the plan: {', '.join(unknown)} (see --list)", file=sys.stderr)
            return 2
        by_id = {r["id"]: r for r in runs}
        runs = [by_id[rid] for rid in dict.fromkeys(args.only)]  # in the order given: a priority order
    done = {p.stem for p in args.results.glob("*.json")} if args.results.is_dir() else set()
    if args.list:
        for r in runs:
            state = "done" if r["id"] in done else "checkpointed" if any((args.runs / r["id"]).glob("*.pt")) else "to do"
            print(f"{r['id']:32s} {state:12s} {r['epochs']:4d} epochs")
        return 0
    if args.report:
        print(report(args))
        return 0
    try:
        stop_at = parse_stop_at(args.stop_at, dt.datetime.now(dt.timezone.utc)) if args.stop_at else None
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    stopper = Stopper(stop_at)
    try:
        for run in runs:
            if run["id"] in done:
                continue
            if stopper.due():
                break
            if train(run, args, stopper):
                record(run, args)
                report(args)
                print(f"== {run['id']} done", flush=True)
    finally:
        stopper.restore()
    return 130 if stopper.requested else 0


if __name__ == "__main__":
    sys.exit(main())
