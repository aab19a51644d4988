"""The quality study's record of one finished run, and its markdown tables (bench/quality_study.py).

`run_record` reads a finished run folder (summary.json, summary.csv, metrics.jsonl) into the
JSON kept per run: every head's final top-1, the per-epoch train/val losses (the gap), the mask
statistics over training (the last logged interval of each epoch) and the wall time.
`tables` turns the kept records into markdown: one row per run, and per (regime, policy) the
mean and spread over seeds of the best head.
"""
from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

MASK_KEYS = ("mask_pixel_std", "mask_image_std", "mask_saturated", "mix_block_q_norm", "mix_block_v_norm",
             "mix_block_temperature")


def _epoch_series(run_dir: Path) -> list[dict]:
    """Per epoch: train loss, the main head's val loss/top-1 (None where not evaluated)."""
    with open(run_dir / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))

    def num(v):
        return float(v) if v not in ("", None) else None

    return [{"epoch": int(r["epoch"]), "train_loss": num(r["train_loss"]), "val_loss": num(r["eval_loss"]),
             "val_top1": num(r["eval_top1"])} for r in rows]


def _mask_series(run_dir: Path) -> list[dict]:
    """Per epoch, the mask statistics of its last logged interval (AutoMix runs; else empty)."""
    last: dict[int, dict] = {}
    with open(run_dir / "metrics.jsonl") as f:
        for line in f:
            row = json.loads(line)
            if row.get("type") == "train" and "mask_pixel_std" in row["values"]:
                last[row["epoch"]] = {k: row["values"][k] for k in MASK_KEYS if k in row["values"]}
    return [{"epoch": e, **last[e]} for e in sorted(last)]


def run_record(run: dict, run_dir: Path, wall_s: float, environment: dict) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    ev = summary["eval"]
    top1 = {h: ev[f"{h}_top1"] for h in summary["heads"] if f"{h}_top1" in ev}
    return {
        **run,
        "top1": top1,
        "best_head": max(top1, key=top1.get),
        "best_top1": max(top1.values()),
        "epochs_run": summary["epochs"],
        "train_seconds": summary["train_seconds"],
        "wall_s": wall_s,
        "per_epoch": _epoch_series(run_dir),
        "mask_stats": _mask_series(run_dir),
        "environment": environment,
    }


def _fmt(v, spec=".2f"):
    return "" if v is None else format(v, spec)


def _mask_cell(series: list[dict], key: str, spec: str) -> str:
    """The statistic at ~10%, 50% and the end of training: how the masks developed."""
    if not series:
        return ""
    n = len(series)
    picks = [series[min(n - 1, max(0, round(f * n) - 1))] for f in (0.1, 0.5, 1.0)]
    return " / ".join(format(p.get(key, float("nan")), spec) for p in picks)


def run_table(records: list[dict]) -> str:
    lines = ["| run | epochs | top-1 per head | train loss (policy's total) | val loss | mask px-sd (10%/50%/end) | img-sd end "
             "| saturated end | wall s | s/epoch |", "|" + "---|" * 10]
    for r in sorted(records, key=lambda r: (r["regime"], r["policy"], r["seed"])):
        last = r["per_epoch"][-1] if r["per_epoch"] else {}
        mask = r["mask_stats"]
        heads = " ".join(f"{h} {v:.2f}" for h, v in r["top1"].items())
        lines.append(
            f"| {r['id']} | {r['epochs_run']} | {heads} | {_fmt(last.get('train_loss'), '.3f')} "
            f"| {_fmt(last.get('val_loss'), '.3f')} | {_mask_cell(mask, 'mask_pixel_std', '.3g')} "
            f"| {_fmt(mask[-1].get('mask_image_std') if mask else None, '.3g')} "
            f"| {_fmt(100 * mask[-1]['mask_saturated'] if mask else None, '.0f')}{'%' if mask else ''} "
            f"| {r['wall_s']:.0f} | {r['wall_s'] / r['epochs_run']:.0f} |")
    return "\n".join(lines)


def cell_table(records: list[dict]) -> str:
    """Mean (min-max) over seeds of the best head's top-1, per (regime, policy)."""
    cells: dict[tuple, list[dict]] = {}
    for r in records:
        cells.setdefault((r["regime"], r["policy"]), []).append(r)
    # The fastest seed's wall time: the run least disturbed by whatever else used the machine.
    fastest = {key: min(r["wall_s"] for r in rs) for key, rs in cells.items()}
    lines = ["| regime | policy | seeds | best head top-1: mean (min-max) | heads | fastest wall s | x vanilla's |",
             "|" + "---|" * 7]
    for (regime, policy), rs in sorted(cells.items()):
        best = [r["best_top1"] for r in rs]
        heads = ", ".join(sorted({r["best_head"] for r in rs}))
        base = fastest.get((regime, "vanilla"))
        ratio = f"{fastest[regime, policy] / base:.2f}" if base else ""
        lines.append(f"| {regime} | {policy} | {len(rs)} | {statistics.mean(best):.2f} ({min(best):.2f}-{max(best):.2f}) "
                     f"| {heads} | {fastest[regime, policy]:.0f} | {ratio} |")
    return "\n".join(lines)


def gap_table(records: list[dict]) -> str:
    """Vanilla's train loss against its val loss at each evaluated epoch: where the gap opens."""
    lines = ["| run | epoch: train loss / val loss / val top-1 |", "|---|---|"]
    for r in sorted(records, key=lambda r: r["id"]):
        if r["policy"].startswith("vanilla"):
            cells = [f"{e['epoch']}: {e['train_loss']:.3f} / {e['val_loss']:.3f} / {e['val_top1']:.1f}"
                     for e in r["per_epoch"] if e["val_loss"] is not None and e["train_loss"] is not None]
            lines.append(f"| {r['id']} | {'; '.join(cells)} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def mask_table(records: list[dict], points: int = 6) -> str:
    """AutoMix runs' masks over training: pixel spread, image spread and W_q's norm at a few
    evenly spaced epochs (the saddle: px-sd ~1e-5 and a shrinking W_q; off it: px-sd ~0.1)."""
    lines = ["| run | epoch: mask px-sd / img-sd / W_q norm |", "|---|---|"]
    for r in sorted(records, key=lambda r: r["id"]):
        series = r["mask_stats"]
        if not series or r["regime"] == "probe":
            continue
        n = len(series)
        picks = sorted({min(n - 1, round(i * (n - 1) / (points - 1))) for i in range(points)})
        cells = [f"{series[i]['epoch']}: {series[i]['mask_pixel_std']:.2g} / {series[i]['mask_image_std']:.2g} / "
                 f"{series[i].get('mix_block_q_norm', float('nan')):.2f}" for i in picks]
        lines.append(f"| {r['id']} | {'; '.join(cells)} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def tables(records: list[dict]) -> str:
    if not records:
        return "(no finished runs yet)"
    text = "### Per (regime, policy)\n\n" + cell_table(records) + "\n\n### Per run\n\n" + run_table(records) + "\n"
    masks = mask_table(records)
    text += "\n### AutoMix's masks over training\n\n" + masks + "\n" if masks else ""
    gaps = gap_table(records)
    return text + ("\n### Vanilla's train/val gap\n\n" + gaps + "\n" if gaps else "")
