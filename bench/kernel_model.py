"""Bytes-and-FLOPs floor of each Mix Block op at each preset, and what the compiled kernels can reach on an H100.

    python bench/kernel_model.py                 # reads bench/results/aot-compile-triton<ver>.json
    python bench/kernel_model.py --report my-aot.json --output model.json

For every (preset, dtype, layout, mode, pass) the AOT report (bench/aot_compile.py) captured:
- mask_mix (memory-bound): the minimum bytes an op must move (forward: read x and x[perm],
  write x_mix; backward: read the gradient of x_mix, x and x[perm]; plus the small logits,
  s_mean, d logits and, in bilinear mode, the (N, H, w) buffer between the two backward
  kernels), so that bench_ops.py's GB/s reads as a fraction of the floor.
  From the compiled kernel (registers, shared memory, warps, block size, load width), an
  estimate of the fraction of H100 HBM bandwidth it can reach, by Little's law: an SM keeps
  `resident threads x bytes each thread has in flight` outstanding; HBM needs
  `bandwidth x latency / SMs` outstanding per SM to stay busy.
- attention (small GEMMs): the minimum FLOPs (forward 2 N L^2 D for q k^T plus N L^2 for P v;
  backward 6 N L^2 D: scores once, dq, dk) against what the launched kernels execute (the
  backward recomputes the scores in both kernels, once per D chunk in the tiled path) and the
  minimum bytes (q, k, v in, out and lse out; backward adds g in, dq, dk, dv out).
These are models, not measurements: the estimate says whether a kernel's shape can saturate
HBM, not that it will.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from aot_compile import PRESETS  # noqa: E402
from common import RESULTS  # noqa: E402

# H100 SXM (the target the numbers are read against); latency is a typical loaded DRAM latency.
H100 = {"name": "H100 SXM", "hbm_bytes_per_s": 3.35e12, "sms": 132, "regs_per_sm": 65536, "smem_per_sm": 228 * 1024,
        "threads_per_sm": 2048, "blocks_per_sm": 32, "dram_latency_s": 700e-9}
ESIZE = {"fp32": 4, "fp16": 2, "bf16": 2}


def shapes(preset: str) -> dict:
    n, c, h, size, _ = PRESETS[preset]
    return dict(N=n, C_feat=c, D=c // 2, h=h, L=h * h, H=size, W=size, C=3)


def mask_mix_bytes(s: dict, dtype: str, pass_: str, mode: str) -> int:
    image = s["N"] * s["C"] * s["H"] * s["W"] * ESIZE[dtype]
    logits = s["N"] * s["L"] * 4
    if pass_ == "fwd":
        return 3 * image + logits + s["N"] * 4
    backward = 3 * image + logits + logits  # g, x, x[perm]; logits in; dlogits out
    if mode == "nearest":  # one kernel
        return backward
    t_buffer = s["N"] * s["H"] * s["h"] * 4  # the (N, H, w) float32 buffer between the two kernels
    return backward + 2 * t_buffer  # written by the rows kernel, read by the columns kernel


def attention_floor(s: dict, dtype: str, pass_: str) -> tuple[float, int]:
    n, L, D, e = s["N"], s["L"], s["D"], ESIZE[dtype]
    if pass_ == "fwd":
        return 2 * n * L * L * D + 2 * n * L * L, 2 * n * L * D * e + n * L * e + 2 * n * L * 4
    return 6 * n * L * L * D, 4 * n * L * D * e + 2 * n * L * e + 3 * n * L * 4  # q,k in, dq,dk out; v,dv; out,lse,g


def attention_executed(s: dict, kernel: str, grid: list[int]) -> float:
    """FLOPs the launched backward kernel runs: scores recomputed once per D chunk (grid axis 1)."""
    n, L, D = s["N"], s["L"], s["D"]
    chunks = grid[1] if len(grid) > 1 else 1
    scores = 2 * n * L * L * D
    if kernel == "_fwd":
        return scores + 2 * n * L * L
    return chunks * scores + 2 * n * L * L * D  # recomputed scores + its own GEMM (dq or dk)


def occupancy(res: dict, warps: int, gpu=H100) -> int:
    """Resident threads per SM from registers, shared memory and the hardware limits."""
    threads = 32 * warps
    regs = max(res["registers"], 1)
    by_regs = gpu["regs_per_sm"] // (((regs * 32 + 255) // 256) * 256 * warps)  # 256-register allocation unit per warp
    by_smem = gpu["smem_per_sm"] // max(res["smem"], 1)
    blocks = max(0, min(by_regs, by_smem, gpu["blocks_per_sm"], gpu["threads_per_sm"] // threads))
    return blocks * threads


def inflight_bytes_per_thread(kernel: str, constexprs: dict, warps: int, dtype: str) -> int:
    """Image bytes one thread loads per loop iteration (what it can have outstanding)."""
    threads = 32 * warps
    e = ESIZE[dtype]
    if kernel == "_fwd":  # one channel plane of x and x[perm] a step when the channels are a loop
        return 2 * constexprs["ROWS"] * constexprs["BLOCK_E"] * e // threads
    if kernel == "_bwd_rows":
        per_row = constexprs["BLOCK_X"] * (1 if constexprs.get("CHANNELS_INNER") else constexprs["BLOCK_C"])
        return 3 * constexprs["ROWS"] * per_row * e // threads
    if kernel == "_bwd_nearest":  # one channel plane an iteration when the channels are a loop
        return 3 * constexprs["ROWS"] * constexprs["BLOCK_E"] * e // threads
    return 0


def hbm_fraction(res: dict, kernel: str, constexprs: dict, warps: int, dtype: str, blocks: int, gpu=H100) -> dict:
    resident = occupancy(res, warps, gpu)
    per_thread = inflight_bytes_per_thread(kernel, constexprs, warps, dtype)
    # A grid smaller than the GPU leaves SMs idle: scale by the share of SMs with work.
    sm_share = min(1.0, blocks / gpu["sms"]) if blocks else 1.0
    needed = gpu["hbm_bytes_per_s"] * gpu["dram_latency_s"] / gpu["sms"]
    return {"resident_threads_per_sm": resident, "inflight_bytes_per_sm": resident * per_thread,
            "needed_bytes_per_sm": round(needed), "sm_share": round(sm_share, 3),
            "hbm_fraction": round(min(1.0, resident * per_thread / needed) * sm_share, 3)}


def build(report: dict) -> dict:
    kernels = report["kernels"]
    rows = []
    for u in report["launches"]:
        k = kernels[u["spec"]]
        op = "mask_mix" if k["module"].endswith("mask_mix") else "attention"
        s = shapes(u["preset"])
        row = {key: u[key] for key in ("preset", "dtype", "layout", "mode", "lam_concat", "pass_", "kernel", "blocks")}
        row["op"] = op
        warps = k["options"]["num_warps"]
        if op == "mask_mix":
            if u["kernel"] == "_bwd_cols":
                continue  # reads the small (N, H, w) buffer only; counted with _bwd_rows
            row["min_bytes"] = mask_mix_bytes(s, u["dtype"], u["pass_"], u["mode"])
            # The floor in time at full HBM bandwidth: below ~5 us a launch costs more than the bytes.
            row["hbm_floor_us"] = round(row["min_bytes"] / H100["hbm_bytes_per_s"] * 1e6, 2)
            for t in report["meta"]["targets"]:
                if k[t]["ok"]:
                    row[t] = hbm_fraction(k[t], u["kernel"], k["constexprs"], warps, u["dtype"], u["blocks"])
            row["registers"] = {t: k[t].get("registers") for t in report["meta"]["targets"]}
        else:
            flops, nbytes = attention_floor(s, u["dtype"], u["pass_"])
            row["min_flops"] = flops
            row["min_bytes"] = nbytes
            row["grid"] = u.get("grid")
            if row["grid"]:
                row["executed_flops"] = attention_executed(s, u["kernel"], row["grid"])
        rows.append(row)
    # Whole attention backward (dq kernel + dk/dv kernel) against its minimum, per configuration.
    totals: dict = {}
    for r in rows:
        if r["op"] == "attention" and r["pass_"] == "bwd" and "executed_flops" in r:
            key = tuple(r[k] for k in ("preset", "dtype", "layout", "mode", "lam_concat"))
            totals[key] = totals.get(key, 0) + r["executed_flops"]
    for r in rows:
        key = tuple(r[k] for k in ("preset", "dtype", "layout", "mode", "lam_concat"))
        if r["op"] == "attention" and r["pass_"] == "bwd" and key in totals:
            r["backward_executed_over_min"] = round(totals[key] / r["min_flops"], 2)
    return {"meta": {"what": "bytes-and-FLOPs floors per op and preset, and an HBM-bandwidth estimate of the "
                             "compiled mask kernels (bench/kernel_model.py)", "gpu_model": H100,
                     "aot_report": {k: report["meta"][k] for k in ("triton", "git_commit", "date")}},
            "rows": rows}


def summary(model: dict) -> str:
    out = [f"{'preset':<13} {'dtype':<5} {'layout':<13} {'mode':<8} {'pass':<4} {'kernel':<10} "
           f"{'min MB, us / GFLOP':>18} {'HBM est./work':>14}"]
    seen = set()
    for r in model["rows"]:
        key = (r["preset"], r["dtype"], r["layout"], r["mode"], r["pass_"], r["kernel"], r["op"])
        if key in seen or r["mode"] == "bilinear" and r["op"] == "attention":
            continue
        seen.add(key)
        if r["op"] == "mask_mix":
            amount = f"{r['min_bytes'] / 1e6:.1f} MB {r['hbm_floor_us']:.0f} us"
            est = f"{r['sm_90']['hbm_fraction']:.0%}" if "sm_90" in r else "-"
        else:
            amount = f"{r['min_flops'] / 1e9:.2f} GFLOP"
            est = f"bwd x{r['backward_executed_over_min']:.2f}" if "backward_executed_over_min" in r else ""
        out.append(f"{r['preset']:<13} {r['dtype']:<5} {r['layout']:<13} {r['mode']:<8} {r['pass_']:<4} {r['kernel']:<10} "
                   f"{amount:>18} {est:>14}")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--report", type=Path, default=None, help="AOT compile report (default: the newest in bench/results)")
    p.add_argument("--output", type=Path, default=None)
    args = p.parse_args(argv)
    path = args.report or max(RESULTS.glob("aot-compile-triton*.json"), key=lambda q: q.stat().st_mtime)
    model = build(json.loads(path.read_text()))
    out = args.output or RESULTS / f"kernel-model-triton{model['meta']['aot_report']['triton']}.json"
    out.write_text(json.dumps(model, indent=1) + "\n")
    print(summary(model))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
