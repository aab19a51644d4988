"""`summary.csv` beside `metrics.jsonl`: one row per epoch with timm's columns.

    epoch, train_loss, eval_loss, eval_top1, eval_top5, lr[, eval_<head>_top1, eval_<head>_top5 ...]

The eval columns are the main head's (the first the policy names: `one` for the baselines,
`q_one` for AutoMix); the other heads follow with their name in the column. train_loss is
the epoch's mean training loss, lr the last step's. The file is rewritten whole from the run
history (which checkpoints carry) after each epoch, through a temp file and a rename: a
resumed run keeps its earlier rows, and an epoch redone after a crash is never listed twice.
"""
from __future__ import annotations

import csv
import io
import os
from pathlib import Path

from automix_fast.atomic import write_text

COLUMNS = ("epoch", "train_loss", "eval_loss", "eval_top1", "eval_top5", "lr")


def summary_table(history: list[dict], heads: list[str]) -> tuple[list[str], list[list]]:
    """(header, rows) from Trainer.history entries {"epoch", "train": means, "eval": results}."""
    main, others = heads[0], heads[1:]
    header = list(COLUMNS) + [f"eval_{h}_top{k}" for h in others for k in (1, 5)]
    rows = []
    for entry in history:
        train, ev = entry.get("train", {}), entry.get("eval", {})
        row = [entry["epoch"], train.get("epoch_loss", train.get("loss")), ev.get(f"{main}_loss"),
               ev.get(f"{main}_top1"), ev.get(f"{main}_top5"), train.get("lr")]
        row += [ev.get(f"{h}_top{k}") for h in others for k in (1, 5)]
        rows.append(["" if v is None else v for v in row])
    return header, rows


def write_summary_csv(path: str | os.PathLike, history: list[dict], heads: list[str]) -> None:
    path = Path(path)
    header, rows = summary_table(history, heads)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    write_text(path, buf.getvalue())
