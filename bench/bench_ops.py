"""Benchmark the Mix Block ops: Triton kernels vs the torch reference vs torch.compile(reference).

Provider `triton-tiled` (attention only) runs the Triton attention with its backward forced to
`attention_backward(tiling="tiled")`, to set against `triton` (the launcher's automatic choice)
at the same shapes.

    python bench/bench_ops.py                      # every preset, op, pass and provider (CUDA)
    python bench/bench_ops.py --presets cifar-r18 --ops mask_mix --providers triton torch
    TRITON_INTERPRET=1 python bench/bench_ops.py --smoke   # tiny CPU run that checks the script

Times are medians of triton.testing.do_bench (CUDA; --warmup-ms and --rep-ms set its budget).
Results, with the GPU name, library versions, git commit and the device-to-device copy bandwidth
measured in the same run, go to output/bench/ops-<gpu>-<date>.json (--output to choose), rewritten
after every (preset, provider, op) so a run stopped part-way keeps what it measured; a short
table is printed. See bench/README.md.
"""
from __future__ import annotations

import argparse
import datetime as dt
import platform
import re
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import git_commit, results_path  # noqa: E402

from automix_fast import ops  # noqa: E402
from automix_fast.atomic import write_json  # noqa: E402
from automix_fast.kernels import mixblock_attention  # noqa: E402
from automix_fast.ops import reference  # noqa: E402

# name: (N, L, D, image size); images are (N, 3, S, S) bf16 channels-last, logits (N, 1, h, h), h*h = L.
PRESETS = {
    "cifar-r18": (100, 64, 128, 32),
    "imagenet-r18": (256, 196, 128, 224),
    "imagenet-r50": (256, 196, 512, 224),
}
SMOKE_PRESETS = {"smoke": (2, 16, 24, 12)}
PASSES = ("fwd", "bwd", "fwd+bwd")
# triton-tiled: attention only, the Triton forward and the backward forced to tiling "tiled"
# (mixblock_attention.BWD_TILINGS), against `triton`'s automatic choice at the same shapes.
PROVIDERS = ("triton", "torch", "compile", "triton-tiled")
OPS = ("attention", "mask_mix")


# do_bench's warm-up and repetition budgets in ms (--warmup-ms, --rep-ms).
BUDGET_MS = {"warmup": 25, "rep": 100}


def bench_ms(fn, device: torch.device) -> float:
    """Median milliseconds of fn()."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=BUDGET_MS["warmup"], rep=BUDGET_MS["rep"], return_mode="median"))
    fn()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def copy_bandwidth_gbps(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy of a large buffer: (read + write) bytes / median time."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src), device)
    return 2 * nbytes / (ms * 1e-3) / 1e9


class TiledBackwardAttention(mixblock_attention.MixBlockAttention):
    """The Triton attention's autograd Function with its backward's tiling forced to "tiled"
    (bench only; the forward, what is saved and which gradients are computed are the Function's)."""

    @staticmethod
    def backward(ctx, g):
        return mixblock_attention._backward(ctx, g, partial(mixblock_attention.attention_backward, tiling="tiled"))


def attention_fns(provider: str):
    if provider == "triton-tiled":
        return lambda q, k, v: TiledBackwardAttention.apply(q, k, v, q.shape[-1] ** -0.5)
    if provider == "triton":
        return lambda q, k, v: ops.mixblock_attention(q, k, v, backend="triton")
    if provider == "torch":
        return lambda q, k, v: reference.mixblock_attention(q, k, v)
    return torch.compile(reference.mixblock_attention)


def mask_mix_fns(provider: str, mode: str):
    if provider == "triton":
        return lambda lg, x, perm: ops.mask_mix(lg, x, perm, mode=mode, backend="triton")
    if provider == "torch":
        return lambda lg, x, perm: reference.mask_mix(lg, x, perm, mode)
    compiled = torch.compile(reference.mask_mix)
    return lambda lg, x, perm: compiled(lg, x, perm, mode)


def measure(make_out, inputs, grads, device: torch.device, passes=PASSES) -> dict:
    """Median ms of forward, backward (graph kept, grads w.r.t. `inputs`) and both, as `passes`
    asks; peak memory (of fwd+bwd, when asked for)."""
    outs = make_out()
    outs = outs if isinstance(outs, tuple) else (outs,)

    def bwd():
        torch.autograd.grad(outs, inputs, grads, retain_graph=True)

    def both():
        o = make_out()
        torch.autograd.grad(o if isinstance(o, tuple) else (o,), inputs, grads)

    fns = {"fwd": make_out, "bwd": bwd, "fwd+bwd": both}
    res = {p: bench_ms(fns[p], device) for p in passes}
    outs = None  # drop the kept graph before measuring peak memory
    peak = None
    if device.type == "cuda" and "fwd+bwd" in passes:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        both()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    return {"ms": res, "peak_extra_mib": peak}


def run_attention(preset, shape, provider, device, dtype, passes=PASSES) -> list[dict]:
    N, L, D, _ = shape
    gen = torch.Generator(device="cpu").manual_seed(0)
    q, k = (torch.randn(N, L, D, generator=gen).to(device, dtype).requires_grad_(True) for _ in range(2))
    v = torch.randn(N, L, generator=gen).to(device, dtype).requires_grad_(True)
    g = torch.randn(N, L, generator=gen).to(device)
    fn = attention_fns(provider)
    m = measure(lambda: fn(q, k, v), (q, k, v), (g,), device, passes)
    flops = {"fwd": 2 * N * L * L * D, "bwd": 4 * N * L * L * D}
    flops["fwd+bwd"] = flops["fwd"] + flops["bwd"]
    return [{"op": "attention", "preset": preset, "provider": provider, "pass": p, "ms": m["ms"][p],
             "tflops": flops[p] / (m["ms"][p] * 1e-3) / 1e12, "peak_extra_mib": m["peak_extra_mib"],
             "shape": {"N": N, "L": L, "D": D, "dtype": str(dtype)}} for p in passes]


def run_mask_mix(preset, shape, provider, device, dtype, mode) -> list[dict]:
    N, L, _, S = shape
    h = int(round(L ** 0.5))
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(N, 3, S, S, generator=gen).to(device, dtype).contiguous(memory_format=torch.channels_last)
    logits = torch.randn(N, 1, h, h, generator=gen).to(device).requires_grad_(True)
    perm = torch.randperm(N, generator=gen).to(device)
    g = torch.randn(N, 3, S, S, generator=gen).to(device, dtype).contiguous(memory_format=torch.channels_last)
    gs = torch.randn(N, generator=gen).to(device)
    fn = mask_mix_fns(provider, mode)
    m = measure(lambda: fn(logits, x, perm), (logits,), (g, gs), device)
    img = x.numel() * x.element_size()
    nbytes = {"fwd": 3 * img, "bwd": 3 * img, "fwd+bwd": 6 * img}  # fwd: x, x[perm], x_mix; bwd: g, x, x[perm]
    return [{"op": f"mask_mix-{mode}", "preset": preset, "provider": provider, "pass": p, "ms": m["ms"][p],
             "gbps": nbytes[p] / (m["ms"][p] * 1e-3) / 1e9, "peak_extra_mib": m["peak_extra_mib"],
             "shape": {"N": N, "C": 3, "H": S, "W": S, "h": h, "dtype": str(dtype), "memory_format": "channels_last"}}
            for p in PASSES]


def print_table(rows: list[dict], copy_gbps: float | None) -> None:
    if copy_gbps:
        print(f"device-to-device copy: {copy_gbps:.0f} GB/s")
    print(f"{'op':<20}{'preset':<14}{'provider':<14}{'pass':<9}{'ms':>9}{'rate':>14}{'peak MiB':>10}")
    for r in rows:
        if "error" in r:
            print(f"{r['op']:<20}{r['preset']:<14}{r['provider']:<14}{'-':<9}  error: {r['error'][:60]}")
            continue
        rate = f"{r['tflops']:.2f} TFLOP/s" if "tflops" in r else f"{r['gbps']:.0f} GB/s"
        peak = "" if r["peak_extra_mib"] is None else f"{r['peak_extra_mib']:.0f}"
        print(f"{r['op']:<20}{r['preset']:<14}{r['provider']:<14}{r['pass']:<9}{r['ms']:>9.3f}{rate:>14}{peak:>10}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", choices=list(PRESETS), default=list(PRESETS))
    ap.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    ap.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS))
    ap.add_argument("--modes", nargs="+", choices=ops.MODES, default=["nearest", "bilinear"], help="mask_mix upsampling modes")
    ap.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    ap.add_argument("--output", type=Path, default=None, help="JSON path (default output/bench/ops-<gpu>-<date>.json)")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes; runs on CPU under TRITON_INTERPRET=1 to check the script")
    ap.add_argument("--warmup-ms", type=int, default=BUDGET_MS["warmup"], help="do_bench warm-up per measurement")
    ap.add_argument("--rep-ms", type=int, default=BUDGET_MS["rep"], help="do_bench repetitions per measurement")
    args = ap.parse_args(argv)
    BUDGET_MS.update(warmup=args.warmup_ms, rep=args.rep_ms)

    if torch.cuda.is_available():
        device = torch.device("cuda")
    elif args.smoke and ops.triton_interpret():
        device = torch.device("cpu")
    else:
        print("bench_ops.py: no CUDA device; these benchmarks time GPU kernels. "
              "For a CPU check of the script: TRITON_INTERPRET=1 python bench/bench_ops.py --smoke", file=sys.stderr)
        return 0
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    presets = SMOKE_PRESETS if args.smoke else {p: PRESETS[p] for p in args.presets}
    providers = [p for p in args.providers if not (args.smoke and p == "compile")]

    import triton

    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "cpu-interpreter"
    copy_gbps = copy_bandwidth_gbps(device) if device.type == "cuda" else None
    meta = {
        "gpu": gpu, "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
        "python": platform.python_version(), "commit": git_commit(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "copy_gbps": copy_gbps, "dtype": args.dtype,
        "timer": (f"triton.testing.do_bench median ({args.warmup_ms} ms warm-up, {args.rep_ms} ms repetitions)"
                  if device.type == "cuda" else "perf_counter median of 3"),
        "counted": {"attention_flops": "fwd 2*N*L*L*D, bwd 4*N*L*L*D (no recompute counted)",
                    "mask_mix_bytes": "fwd: read x and x[perm], write x_mix; bwd: read grad, x, x[perm]"},
    }
    out = args.output
    if out is None:
        slug = re.sub(r"[^A-Za-z0-9]+", "-", gpu).strip("-").lower()
        out = results_path("ops", slug, "-smoke" if args.smoke else "")
    rows = []
    # Preset by preset, then triton-tiled last (a stage cut short keeps the figures that matter
    # most), its backward only, and only where tiling "tiled" recomputes nothing: fp16/bf16 at
    # D <= 128 (one 128-column D chunk).
    runs = [(preset, shape, provider) for preset, shape in presets.items() for provider in providers
            if provider != "triton-tiled"]
    if "triton-tiled" in providers and dtype != torch.float32:
        runs += [(preset, shape, "triton-tiled") for preset, shape in presets.items() if shape[2] <= 128]
    for preset, shape, provider in runs:
        jobs = []
        passes = ("bwd",) if provider == "triton-tiled" else PASSES
        if "attention" in args.ops:
            jobs.append(("attention", lambda: run_attention(preset, shape, provider, device, dtype, passes)))
        if "mask_mix" in args.ops and provider != "triton-tiled":
            for mode in args.modes:
                jobs.append((f"mask_mix-{mode}", lambda mode=mode: run_mask_mix(preset, shape, provider, device, dtype, mode)))
        for op, job in jobs:
            try:
                rows += job()
            except Exception as exc:  # a provider failing (e.g. torch.compile) must not lose the others
                rows.append({"op": op, "preset": preset, "provider": provider, "error": f"{type(exc).__name__}: {exc}"})
            if device.type == "cuda":
                torch.cuda.empty_cache()
            write_json(out, {"meta": meta, "results": rows})

    print_table(rows, copy_gbps)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
