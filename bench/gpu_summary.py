"""One summary of a gpu_check.sh run: every figure of the targets, from the stages' JSON files.

    python bench/gpu_summary.py --record-env OUT [--mode quick] [--dry-run] [--require-cuda]
    python bench/gpu_summary.py OUT          # -> OUT/gpu-check.json and a table on stdout

The first form runs before the stages: it writes OUT/env.json (device, torch / triton / CUDA /
Python versions, git commit, date, the check's mode) and, with --require-cuda, exits 2 when
torch sees no CUDA device. The second reads what the stages left in OUT (env.json,
stages.jsonl: one line per stage with its exit status and time; ops.json; train-<preset>.json;
loader.json; pytest-gpu.xml) and writes OUT/gpu-check.json. Every figure is an object with
`value` (a number, or null) and, when null, `reason` (the stage timed out, failed, was not part of
this mode, or the figure needs CUDA), plus `unit`, `source` and the numbers it is made of.
`train_rows` lists every training-step row measured (img/s, step time, peak memory, warm-up).
"""
from __future__ import annotations

import argparse
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

# The training presets of the targets: name -> what gpu_check.sh runs for it on a GPU.
TRAIN_PRESETS = {
    "imagenet-r50": "resnet50, 224 px, batch 128",
    "cifar-r18": "resnet18_cifar, 32 px, batch 100",
    "imagenet-r18": "resnet18, 224 px, batch 256",
}
OPS_PRESETS = ("cifar-r18", "imagenet-r18", "imagenet-r50")
MASK_MODE = "nearest"  # the training default (mask_mode)
FLOOR = 2.9  # bench/README.md "The ~2.9 floor"
# The graphed rows checked against the eager rows of the same code: {preset: {name: (mix, graphed, eager)}}.
GRAPHED_PAIRS = {
    "imagenet-r50": {"automix": ("automix", "graphed", "optimized"),
                     "vanilla-compiled": ("vanilla", "graphed-compiled", "compiled"),
                     "automix-fp16": ("automix", "graphed-fp16", "optimized-fp16")},
    "cifar-r18": {**{m: (m, "graphed", "optimized") for m in ("automix", "vanilla", "mixup")},
                  "automix-compiled-step": ("automix", "graphed-compiled-step", "compiled-step")},
}
# The ways mixup/vanilla is compared, per preset ("*": the others): (name, configuration).
MIXUP_RATIO_WAYS = {"*": (("eager", "optimized"), ("compiled", "compiled")),
                    "cifar-r18": (("eager", "optimized"), ("compiled", "compiled"), ("cuda-graph", "graphed"))}
MIXUP_TARGET = 0.95  # bench/README.md "Mixup against vanilla": the least mixup/vanilla img/s
SUMMARY = "gpu-check.json"


class Missing(Exception):
    """A figure cannot be given; str() is the reason."""


# ----------------------------------------------------------------------------- environment

def record_env(out: Path, mode: str, dry_run: bool, require_cuda: bool) -> int:
    import torch

    from common import environment

    if require_cuda and not torch.cuda.is_available():
        print("error: no CUDA device visible to torch; gpu_check.sh needs a GPU (--dry-run runs it on CPU)", file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() and not dry_run else "cpu")
    env = {**environment(device), "mode": mode, "dry_run": dry_run}
    out.mkdir(parents=True, exist_ok=True)
    (out / "env.json").write_text(json.dumps(env, indent=2) + "\n")
    print(f"{env['device']}; torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, "
          f"Python {env['python']}, DALI {env['dali'] or 'absent'}; commit {env['commit']}")
    return 0


# ----------------------------------------------------------------------------- reading the stages

class Run:
    """What one gpu_check.sh output folder holds."""

    def __init__(self, out: Path):
        self.out = out
        self.env = self._json("env.json") or {}
        self.stages: dict[str, dict] = {}
        lines = (out / "stages.jsonl").read_text().splitlines() if (out / "stages.jsonl").exists() else []
        for line in lines:
            if line.strip():
                rec = json.loads(line)
                self.stages[rec["stage"]] = rec

    def _json(self, name: str):
        path = self.out / name
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:  # a stage killed while writing
            return None

    def stage_problem(self, stage: str) -> str | None:
        """Why a stage's results may be missing or partial, or None when it ended well."""
        rec = self.stages.get(stage)
        if rec is None:
            return f"stage {stage} did not run (not part of {self.mode_name()})"
        if rec["rc"] in (124, 137):
            return f"stage {stage} timed out after {rec['limit_s']} s"
        if rec["rc"] != 0:
            return f"stage {stage} failed (exit {rec['rc']}; see {stage}.log)"
        return None

    def mode_name(self) -> str:
        mode = "gpu_check.sh" + (" --quick" if self.env.get("mode") == "quick" else "")
        return mode + (" --dry-run" if self.env.get("dry_run") else "")

    def results(self, stage: str, name: str):
        """The JSON a stage wrote, or Missing with the stage's story."""
        data = self._json(name)
        if data is None:
            raise Missing(self.stage_problem(stage) or f"stage {stage} wrote no {name}")
        return data

    def absent(self, stage: str, what: str) -> Missing:
        """A row the stage's JSON lacks: the stage's problem when it had one."""
        problem = self.stage_problem(stage)
        return Missing(f"{problem} before measuring {what}" if problem else f"{what} was not measured")


def figure(fn, **fixed) -> dict:
    """Call fn() -> dict with 'value'; a Missing becomes value null and its reason."""
    try:
        fig = fn()
    except Missing as exc:
        fig = {"value": None, "reason": str(exc)}
    return {**fig, **fixed}


# ----------------------------------------------------------------------------- training step

def train_row(run: Run, preset: str, config: str, mix: str) -> tuple[dict, dict]:
    stage = f"train-{preset}"
    data = run.results(stage, f"{stage}.json")
    row = next((r for r in data["results"] if r["config"] == config and r["mix"] == mix), None)
    if row is None:
        if f"{config}:{mix}" not in data["setup"].get("runs", []):
            raise Missing(f"{config}:{mix} is not part of {run.mode_name()}"
                          + (" (no torch.compile on the CPU)" if "compiled" in config and run.env.get("dry_run")
                             else ""))
        raise run.absent(stage, f"{config}:{mix}")
    if "error" in row:
        raise Missing(f"{config}:{mix} failed: {row['error']}")
    if "skipped" in row:
        raise Missing(f"{config}:{mix} {row['skipped']}")
    return row, data


def setup_of(data: dict) -> dict:
    s = data["setup"]
    return {"model": s["model"], "img_size": s["img_size"], "batch_size": s["batch_size"], "device": data["meta"]["device"]}


def img_per_s(run: Run, preset: str, config: str, mix: str) -> dict:
    row, data = train_row(run, preset, config, mix)
    fig = {"value": row["img_per_s"], "unit": "img/s", "source": f"train-{preset}.json", "step_ms": row["step_ms"],
           **setup_of(data)}
    if row.get("compile"):
        fig["warmup_s"] = row["warmup_s"]
        if "graphs" in row:  # graphs compiled in the warm-up epoch and in the timed ones
            fig["graphs"] = row["graphs"]
    return fig


def graphed_vs_eager(run: Run, preset: str, mix: str, graphed: str = "graphed", eager: str = "optimized") -> dict:
    """How far the --cuda-graph row's weights end from the eager row's (of the same code: eager or
    compiled) after the same steps."""
    a, data = train_row(run, preset, graphed, mix)
    b, _ = train_row(run, preset, eager, mix)
    if "weights_projection" not in a or "weights_projection" not in b:
        raise Missing("the rows hold no weights_projection")
    gap = max(abs(u - v) for u, v in zip(a["weights_projection"], b["weights_projection"]))
    return {"value": gap / b["weights_norm"],
            "unit": f"relative distance of the weights, {graphed} vs {eager}, after the same steps (random projections)",
            "static_steps": a.get("static_steps"), "source": f"train-{preset}.json", **setup_of(data)}


def official_step(run: Run, preset: str) -> dict:
    fig = {**img_per_s(run, preset, "reference", "automix"),
           "what": "AutoMix in the reference configuration (fp32, NCHW, the torch reference ops, eager): the "
                   "official step's plain-PyTorch way of running, in this engine"}
    try:
        opt, _ = train_row(run, preset, "optimized", "automix")
        fig["optimized_over_reference"] = round(opt["img_per_s"] / fig["value"], 3)
    except Missing:
        pass
    return fig


def img_ratio(run: Run, preset: str, config: str, num: str, den: str) -> dict:
    a, data = train_row(run, preset, config, num)
    b, _ = train_row(run, preset, config, den)
    return {"value": round(a["img_per_s"] / b["img_per_s"], 3), "unit": f"{num}/{den} img/s",
            "source": f"train-{preset}.json", num: a["img_per_s"], den: b["img_per_s"], **setup_of(data)}


def step_ratio(run: Run, preset: str) -> dict:
    a, data = train_row(run, preset, "optimized", "automix")
    b, _ = train_row(run, preset, "optimized", "mixup")
    return {"value": round(a["step_ms"] / b["step_ms"], 3), "unit": "automix/mixup step time", "floor": FLOOR,
            "source": f"train-{preset}.json", **setup_of(data)}


def profiled(run: Run, preset: str, mix: str, key: str, unit: str) -> dict:
    row, data = train_row(run, preset, "optimized", mix)
    prof = row.get("profile")
    if prof is None:
        raise Missing(f"optimized:{mix} was not profiled")
    if "error" in prof:
        raise Missing(f"the profile of optimized:{mix} failed: {prof['error']}")
    if prof[key] is None:
        raise Missing("needs CUDA: the profile holds no GPU kernels (this run is on CPU)" if data["meta"]["gpu"] is None
                      else "the profile recorded no GPU kernels (CUPTI unavailable?)")
    extra = {k: prof[k] for k in ("busy_ms_per_step", "kernel_ms_per_step", "busy_share_in_trace", "steps") if k in prof}
    return {"value": prof[key], "unit": unit, "source": f"train-{preset}.json", "step_ms": row["step_ms"],
            **extra, **setup_of(data)}


def peak(run: Run, preset: str, mix: str) -> dict:
    row, data = train_row(run, preset, "optimized", mix)
    if "peak_mib" not in row:
        raise Missing("needs CUDA: torch.cuda.max_memory_allocated (this run is on CPU)")
    return {"value": row["peak_mib"], "unit": "MiB", "source": f"train-{preset}.json", **setup_of(data)}


def peak_ratio(run: Run, preset: str) -> dict:
    a, b = peak(run, preset, "automix"), peak(run, preset, "mixup")
    return {"value": round(a["value"] / b["value"], 3), "unit": "automix/mixup peak memory",
            "automix_mib": a["value"], "mixup_mib": b["value"], "source": a["source"]}


# ----------------------------------------------------------------------------- ops

def ops_data(run: Run) -> dict:
    data = run.results("ops", "ops.json")
    if not data["meta"]["gpu"] or data["meta"]["gpu"] == "cpu-interpreter":
        raise Missing("needs CUDA: the ops ran under the Triton interpreter at smoke sizes (this run is on CPU)")
    return data


def ops_row(run: Run, op: str, preset: str, provider: str, pas: str) -> dict:
    data = ops_data(run)
    rows = [r for r in data["results"] if r["op"] == op and r["preset"] == preset and r["provider"] == provider]
    err = next((r for r in rows if "error" in r), None)
    if err:
        raise Missing(f"{op} {preset} {provider} failed: {err['error']}")
    row = next((r for r in rows if r["pass"] == pas), None)
    if row is None:
        raise run.absent("ops", f"{op} {preset} {provider} {pas}")
    return row


def copy_gbps(run: Run) -> dict:
    gbps = ops_data(run)["meta"]["copy_gbps"]
    if gbps is None:
        raise Missing("the ops stage measured no copy bandwidth")
    return {"value": round(gbps, 1), "unit": "GB/s", "what": "1 GiB device-to-device copy_, (read + write) bytes / time",
            "source": "ops.json"}


def share_of_copy(run: Run, preset: str, pas: str) -> dict:
    op = f"mask_mix-{MASK_MODE}"
    row = ops_row(run, op, preset, "triton", pas)
    copy = copy_gbps(run)["value"]
    return {"value": round(row["gbps"] / copy, 4), "unit": "share of copy bandwidth", "gbps": round(row["gbps"], 1),
            "copy_gbps": copy, "ms": row["ms"], "op": op, "source": "ops.json"}


def speedup(run: Run, op: str, preset: str) -> dict:
    fast = ops_row(run, op, preset, "triton", "fwd+bwd")
    ref = ops_row(run, op, preset, "torch", "fwd+bwd")
    return {"value": round(ref["ms"] / fast["ms"], 3), "unit": "torch ms / triton ms (fwd+bwd)",
            "triton_ms": fast["ms"], "torch_ms": ref["ms"], "op": op, "source": "ops.json"}


def tiled_backward_speedup(run: Run, preset: str) -> dict:
    auto = ops_row(run, "attention", preset, "triton", "bwd")
    tiled = ops_row(run, "attention", preset, "triton-tiled", "bwd")
    return {"value": round(auto["ms"] / tiled["ms"], 3),
            "unit": "attention backward ms, automatic tiling / tiling \"tiled\" (above 1: tiled is faster)",
            "auto_ms": auto["ms"], "tiled_ms": tiled["ms"], "dtype": ops_data(run)["meta"].get("dtype"), "source": "ops.json"}


def attention_peak_ratio(run: Run, preset: str) -> dict:
    fast = ops_row(run, "attention", preset, "triton", "fwd+bwd")
    ref = ops_row(run, "attention", preset, "torch", "fwd+bwd")
    if fast["peak_extra_mib"] is None or ref["peak_extra_mib"] is None:
        raise Missing("needs CUDA: peak memory (this run is on CPU)")
    return {"value": round(fast["peak_extra_mib"] / ref["peak_extra_mib"], 3), "unit": "triton/torch peak memory",
            "triton_mib": round(fast["peak_extra_mib"], 1), "torch_mib": round(ref["peak_extra_mib"], 1), "source": "ops.json"}


# ----------------------------------------------------------------------------- loader, tests

def loader(run: Run, case: str) -> dict:
    data = run.results("loader", "loader.json")
    skipped = next((s for s in data.get("skipped", []) if s["case"] == case), None)
    if skipped:
        raise Missing(skipped["reason"])
    row = next((r for r in data["results"] if r["case"] == case), None)
    if row is None:
        raise run.absent("loader", case)
    return {"value": row["img_per_s"], "unit": "img/s", "batch_size": row.get("batch_size"), "workers": row.get("workers"),
            "device": data["device"], "source": "loader.json"}


def gpu_tests(run: Run) -> dict:
    path = run.out / "pytest-gpu.xml"
    if not path.exists():
        raise Missing(run.stage_problem("pytest-gpu") or "pytest wrote no report")
    suites = ET.parse(path).getroot()
    suite = suites if suites.tag == "testsuite" else suites.find("testsuite")
    n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failed = n["failures"] + n["errors"]
    return {"value": failed, "unit": "failed tests", "passed": n["tests"] - failed - n["skipped"],
            "skipped": n["skipped"], "source": "pytest-gpu.xml"}


# ----------------------------------------------------------------------------- the summary

def fastest_way(ways: dict) -> dict:
    """The fastest of the measured ways of running AutoMix's official step in the default
    precision (`ways`: name -> figure of automix_img_per_s_by_step): what the CUDA default is to
    be. The q-batched ways change what is computed and the fp16 ways the precision, so they are
    left out; the best fp16 way is reported beside it (`fp16_way`, `fp16_img_per_s`)."""
    rates = {name: fig["value"] for name, fig in ways.items() if fig["value"]}
    default = {name: r for name, r in rates.items() if "q-batched" not in name and not name.endswith("-fp16")}
    if len(default) < 2:
        raise Missing(f"fewer than two ways of running AutoMix's step were measured here ({', '.join(default) or 'none'})")
    best = max(default, key=default.get)
    fig = {"value": default[best], "unit": "img/s", "way": best, "over_eager": None, "measured": default,
           "source": ways[best].get("source")}
    if "eager" in default:
        fig["over_eager"] = round(default[best] / default["eager"], 3)
    fp16 = {name: r for name, r in rates.items() if name.endswith("-fp16")}
    if fp16:
        fig["fp16_way"] = max(fp16, key=fp16.get)
        fig["fp16_img_per_s"] = fp16[fig["fp16_way"]]
    return fig


def figures(run: Run) -> dict:
    def per_preset(fn, presets, *args):
        return {p: figure(lambda p=p: fn(run, p, *args)) for p in presets}

    both = ("imagenet-r50", "cifar-r18")
    # AutoMix per way of running the step, side by side: what the CUDA default is chosen from
    # (the q-batched ways change what the step computes: a named option, never the default;
    # the fp16 ways run float16 autocast with GradScaler, whose BatchNorm is cuDNN's).
    by_step = {
        p: {name: figure(lambda p=p, c=c, m=m: img_per_s(run, p, c, m)) for name, c, m in ways}
        for p, ways in (("imagenet-r50", (("eager", "optimized", "automix"), ("cuda-graph", "graphed", "automix"),
                                          ("eager-fp16", "optimized-fp16", "automix"),
                                          ("cuda-graph-fp16", "graphed-fp16", "automix"))),
                        ("cifar-r18", (("eager", "optimized", "automix"), ("cuda-graph", "graphed", "automix"),
                                       ("compiled-step", "compiled-step", "automix"),
                                       ("cuda-graph-compiled-step", "graphed-compiled-step", "automix"),
                                       ("eager-q-batched", "optimized", "automix-q-batched"),
                                       ("cuda-graph-q-batched", "graphed", "automix-q-batched"))))}
    return {
        "automix_img_per_s": per_preset(img_per_s, both, "optimized", "automix"),
        "official_step_img_per_s": per_preset(official_step, ("imagenet-r50",)),
        "vanilla_img_per_s": {"imagenet-r50": {name: figure(lambda c=c: img_per_s(run, "imagenet-r50", c, "vanilla"))
                                               for name, c in (("eager", "optimized"), ("compiled", "compiled"),
                                                               ("cuda-graph-compiled", "graphed-compiled"),
                                                               ("eager-fp16", "optimized-fp16"))}},
        "automix_img_per_s_by_step": by_step,
        "automix_fastest_way": {p: figure(lambda w=ways: fastest_way(w)) for p, ways in by_step.items()},
        "vanilla_img_per_s_cuda_graph": per_preset(img_per_s, ("cifar-r18",), "graphed", "vanilla"),
        # name: (mix, graphed row, eager row of the same code)
        "cuda_graph_vs_eager_weights": {p: {name: figure(lambda p=p, w=w: graphed_vs_eager(run, p, *w))
                                            for name, w in pairs.items()} for p, pairs in GRAPHED_PAIRS.items()},
        "mixup_vanilla_ratio": {p: {mode: figure(lambda p=p, c=c: img_ratio(run, p, c, "mixup", "vanilla"),
                                                 target=MIXUP_TARGET)
                                    for mode, c in MIXUP_RATIO_WAYS.get(p, MIXUP_RATIO_WAYS["*"])}
                                for p in TRAIN_PRESETS},
        "automix_mixup_step_ratio": per_preset(step_ratio, both),
        "gpu_busy_share": per_preset(profiled, both, "automix", "gpu_busy_share", "GPU-busy time / step time"),
        "launches_per_step": per_preset(profiled, both, "automix", "kernels_per_step", "kernels per step"),
        "peak_mib": {"imagenet-r50": {m: figure(lambda m=m: peak(run, "imagenet-r50", m)) for m in ("vanilla", "mixup", "automix")}},
        "peak_memory_automix_mixup_ratio": per_preset(peak_ratio, ("imagenet-r50",)),
        "copy_gbps": figure(lambda: copy_gbps(run)),
        "mask_mix_share_of_copy": {p: {pas: figure(lambda p=p, pas=pas: share_of_copy(run, p, pas)) for pas in ("fwd", "bwd")}
                                   for p in ("imagenet-r18", "imagenet-r50")},
        "attention_speedup_vs_torch": per_preset(lambda r, p: speedup(r, "attention", p), OPS_PRESETS),
        "mask_mix_speedup_vs_torch": per_preset(lambda r, p: speedup(r, f"mask_mix-{MASK_MODE}", p), OPS_PRESETS),
        "attention_peak_memory_ratio": per_preset(attention_peak_ratio, ("imagenet-r50",)),
        # The backward's tilings side by side where both recompute nothing (D = 128): which to make automatic.
        "attention_bwd_tiled_speedup": per_preset(tiled_backward_speedup, ("cifar-r18", "imagenet-r18")),
        "loader_img_per_s": {"torch-224": figure(lambda: loader(run, "imagenet/torch-stream")),
                             "dali-224": figure(lambda: loader(run, "imagenet/dali"))},
        "gpu_tests_failed": figure(lambda: gpu_tests(run)),
    }


def measured_setup(run: Run, preset: str) -> str | None:
    """'model, N px, batch B' as the preset's stage ran it (the dry run's tiny sizes), or None."""
    data = run._json(f"train-{preset}.json")
    if data is None:
        return None
    s = data["setup"]
    return f"{s['model']}, {s['img_size']} px, batch {s['batch_size']}"


def train_rows(run: Run) -> dict:
    """Every training-step row the stages measured: {preset: {"config:mix": img/s, step ms, peak, ...}}."""
    keep = ("img_per_s", "step_ms", "peak_mib", "warmup_s", "error", "skipped")
    rows = {}
    for preset in TRAIN_PRESETS:
        data = run._json(f"train-{preset}.json")
        if data is not None:
            rows[preset] = {f"{r['config']}:{r['mix']}": {k: r[k] for k in keep if k in r} for r in data["results"]}
    return rows


def leaves(tree: dict, prefix: str = ""):
    """(dotted key, figure) for every figure in a nested figures dict."""
    for key, val in tree.items():
        name = f"{prefix}{key}"
        if "value" in val:
            yield name, val
        else:
            yield from leaves(val, name + ".")


def summarize(out: Path) -> dict:
    run = Run(out)
    env_keys = ("device", "gpu", "cpu", "cpus_usable", "python", "torch", "triton", "cuda", "dali", "numpy", "commit", "date")
    summary = {
        "environment": {k: run.env.get(k) for k in env_keys},
        "mode": run.env.get("mode"),
        "dry_run": run.env.get("dry_run"),
        "stages": run.stages,
        "stage_seconds": round(sum(s["seconds"] for s in run.stages.values()), 1),
        "train_presets": {p: measured_setup(run, p) or planned for p, planned in TRAIN_PRESETS.items()},
        "figures": figures(run),
        "train_rows": train_rows(run),
    }
    (out / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def print_summary(summary: dict, path: Path) -> None:
    env = summary["environment"]
    print(f"{env['device']} | torch {env['torch']} | triton {env['triton']} | commit {env['commit']}")
    for name, stage in summary["stages"].items():
        print(f"  stage {name:<22} exit {stage['rc']:>3}  {stage['seconds']:>6.1f} s of {stage['limit_s']} s")
    for name, fig in leaves(summary["figures"]):
        val = fig["value"]
        text = f"{val:,.4g} {fig.get('unit', '')}" if val is not None else f"null: {fig['reason']}"
        if "way" in fig:
            text += f" ({fig['way']}, {fig['over_eager']}x eager)"
        print(f"  {name:<48} {text}")
    print(f"wrote {path}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="the gpu_check.sh output folder")
    ap.add_argument("--record-env", action="store_true", help="write OUT/env.json (before the stages)")
    ap.add_argument("--mode", choices=["quick", "full"], default="full")
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--require-cuda", action="store_true", help="with --record-env: exit 2 when there is no CUDA device")
    args = ap.parse_args(argv)
    if args.record_env:
        return record_env(args.out, args.mode, args.dry_run, args.require_cuda)
    summary = summarize(args.out)
    print_summary(summary, args.out / SUMMARY)
    return 0


if __name__ == "__main__":
    sys.exit(main())
