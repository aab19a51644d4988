"""`automix-fast eval`: top-1/top-5 of every head of a checkpoint on a folder, with per-class
accuracy and a confusion matrix per head written to JSON.

The data is the checkpoint's own validation split, or `--data-dir` (a dataset root, a folder
holding only val/, or a flat ImageFolder; see automix_fast.data.evalset). No train loader is
built and train/ is not read.
"""
from __future__ import annotations

from pathlib import Path

import torch

from automix_fast import rundir
from automix_fast.commands.common import EVAL_OVERRIDES, eval_data, load_trained
from automix_fast.engine.train_step import autocast


@torch.no_grad()
def confusion_by_head(mixer, loader, num_classes: int, *, amp_dtype, device) -> tuple[dict, dict, int]:
    """({head: (C, C) int64 confusion, rows = true class}, {head: top-5 hits}, image count);
    each backbone runs once per batch for all of its heads."""
    heads = mixer.eval_heads()  # name -> (module, head)
    encoders: dict[int, tuple] = {}
    for name, (module, head) in heads.items():
        encoders.setdefault(id(module), (module, []))[1].append((name, head))
    confusion = {name: torch.zeros(num_classes * num_classes, dtype=torch.int64, device=device) for name in heads}
    top5 = {name: torch.zeros((), dtype=torch.int64, device=device) for name in heads}
    count = 0
    k = min(5, num_classes)
    for x, y in loader:
        with autocast(device, amp_dtype):
            for module, named in encoders.values():
                feat = module.forward_features(x)
                for name, head in named:
                    best = module.forward_head(feat, head=head).float().topk(k, dim=1).indices
                    confusion[name] += torch.bincount(y * num_classes + best[:, 0], minlength=num_classes ** 2)
                    top5[name] += best.eq(y.view(-1, 1)).any(dim=1).sum()
        count += int(y.shape[0])
    return ({n: c.view(num_classes, num_classes).cpu() for n, c in confusion.items()},
            {n: int(t) for n, t in top5.items()}, count)


def report(confusion: dict, top5: dict, count: int, classes: list[str]) -> dict:
    """The per-head JSON: top-1/top-5 (%), per-class accuracy (%), confusion matrix."""
    heads = {}
    for name, conf in confusion.items():
        per_class_total = conf.sum(dim=1)
        per_class = (100.0 * conf.diag().double() / per_class_total.clamp(min=1).double()).tolist()
        heads[name] = {
            "top1": 100.0 * int(conf.diag().sum()) / max(count, 1),
            "top5": 100.0 * top5[name] / max(count, 1),
            "per_class_top1": {c: (a if int(n) else None) for c, a, n in zip(classes, per_class, per_class_total)},
            "confusion_matrix": conf.tolist(),
        }
    return heads


def run(args) -> int:
    overrides = {k: getattr(args, k) for k in EVAL_OVERRIDES if k in vars(args)}
    if "data_dir" in overrides:
        overrides["dataset"] = "auto"  # whatever the folder holds, not what training used
    trained = load_trained(args.checkpoint, overrides)
    # The output is checked before the work and written after the table is printed: a write
    # that still fails loses nothing the user has seen.
    if args.output:
        out = rundir.check_writable(args.output, "eval results")
    else:
        out = rundir.check_writable(rundir.unique_path(trained.path.parent / f"eval-{trained.path.stem}.json"),
                                    "eval results", "pass a writable --output FILE")
    loader, info, _ = eval_data(trained)
    confusion, top5, count = confusion_by_head(trained.mixer, loader, len(info.classes),
                                               amp_dtype=trained.amp_dtype, device=trained.device)
    heads = report(confusion, top5, count, info.classes)
    left_out = sorted(info.bad_files.left_out)  # no decoder reads them: not scored (named above, once each)
    print(f"{args.checkpoint}: {count} images in {info.root}"
          + (f" ({len(left_out)} left out: no decoder reads them)" if left_out else ""))
    print(f"{'head':<8} {'top-1':>7} {'top-5':>7}")
    for name, h in heads.items():
        print(f"{name:<8} {h['top1']:>7.2f} {h['top5']:>7.2f}", flush=True)
    if not args.output:
        out = rundir.unique_path(out)  # another eval may have taken the name meanwhile
    rundir.write_json(out, {
        "checkpoint": str(trained.path), "data": info.root, "count": count, "classes": info.classes,
        "left_out": len(left_out), "left_out_files": left_out, "heads": heads,
    }, "eval results")
    print(f"per-class accuracy and confusion matrices: {out}")
    return 0
