"""Host time of one Mix Block op call: validation, backend choice, buffers, grid and launch.

    python bench/bench_host_overhead.py                 # -> output/bench/host-overhead-cpu-<date>.json
    python bench/bench_host_overhead.py --presets cifar-r18 --calls 500 --output /tmp/host.json
    python bench/bench_host_overhead.py --allocator system    # malloc left as it is (large buffers mmap'd per call)

Each op runs on CPU tensors (--device meta: meta tensors) at the preset shapes of
bench/aot_compile.py inside `automix_fast.kernels.launches.recording()`: the launchers record
their launches instead of running them, so what is timed is the Python around the kernels, with
no GPU and no kernel time; torch's own ops on small buffers (s_mean's sum) run for real on the CPU,
and output buffers are allocated (uninitialised) by the CPU allocator. Triton's own launch path
(argument binding, cache lookup, driver call) is not included. Every call repeats one signature,
as training steps do: the ops' checked-signature cache and the launchers' per-signature plans are
warm after the warm-up calls.

Per op, preset and dtype (images channels-last, the training layout), the median and 90th
percentile over --calls calls (`median_us`, `p90_us`), and the median with each launch replaced
by appending the kernel to a list (`bare_median_us`: the host code without the recorder's own
cost of describing every argument), of:
  fwd        ops.mixblock_attention / ops.mask_mix as a training step calls them (inputs that
             need a gradient, so the autograd node is built too);
  fwd_nograd the same call under torch.no_grad (the backbone mask, x_bb);
  bwd        the backward launchers as the autograd Function calls them.

--allocator caching (the default) makes glibc's malloc behave for this process as the CUDA caching
allocator does on the GPU, where these calls run in training: it never maps memory per call, and a
freed block serves the next call's buffer. glibc, left alone, serves an allocation over 32 MB
(x_mix at 224 px, dq/dk at ImageNet shapes) with mmap and unmaps it when freed, and returns some of
a few MB to the system too (fp32 dq/dk at CIFAR shapes), so they are mapped again on every call, a
cost the GPU never pays; before any tensor is allocated the bench therefore sets, through mallopt,
no mmap (M_MMAP_MAX 0), no trimming (M_TRIM_THRESHOLD -1) and a 256 MiB top pad (M_TOP_PAD), the
same as MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=4294967296 MALLOC_TOP_PAD_=268435456 in the
environment. It needs glibc; --allocator system leaves malloc as it is. The JSON records the
choice.
"""
from __future__ import annotations

import argparse
import ctypes
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from aot_compile import PRESETS  # noqa: E402
from common import environment, write_results  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PASSES = ("fwd", "fwd_nograd", "bwd")
BUDGET_US = 20.0
ALLOCATORS = ("caching", "system")
# glibc's mallopt parameters (malloc.h) and the values of --allocator caching: no mmap, never
# trim, grow the heap 256 MiB beyond each request.
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4
CACHING_MALLOPT = {"M_MMAP_MAX": (M_MMAP_MAX, 0), "M_TRIM_THRESHOLD": (M_TRIM_THRESHOLD, -1),
                   "M_TOP_PAD": (M_TOP_PAD, 256 << 20)}


def use_caching_allocator() -> None:
    """Make glibc's malloc keep and reuse what this process frees (CACHING_MALLOPT); a C library
    without mallopt, or a setting it refuses, ends the run with a one-line error."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError):
        raise SystemExit("error: --allocator caching needs glibc's mallopt, which this C library lacks; "
                         "use --allocator system") from None
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    for name, (param, value) in CACHING_MALLOPT.items():
        if mallopt(param, value) == 0:
            raise SystemExit(f"error: --allocator caching: mallopt({name}, {value}) failed; use --allocator system")


def time_calls(fn, calls: int, recorded: list) -> dict:
    """Median and p90 microseconds of fn() over `calls` calls (after a warm-up)."""
    for _ in range(min(100, calls)):
        fn()
        recorded.clear()
    times = []
    for _ in range(calls):
        t0 = time.perf_counter_ns()
        fn()
        times.append((time.perf_counter_ns() - t0) / 1e3)
        recorded.clear()
    times.sort()
    return {"median_us": round(statistics.median(times), 2), "p90_us": round(times[int(0.9 * (len(times) - 1))], 2)}


def op_calls(op: str, preset: str, dtype: torch.dtype, device: torch.device):
    """{pass: a no-argument callable} for one op at one preset's shapes, on `device` tensors."""
    from automix_fast import ops
    from automix_fast.kernels import mask_mix as mm
    from automix_fast.kernels import mixblock_attention as ma

    n, c, h, size, _ = PRESETS[preset]
    meta = device
    if op == "attention":
        L, D = h * h, c // 2
        q, k = (torch.empty(n, L, D, dtype=dtype, device=meta, requires_grad=True) for _ in range(2))
        v = torch.empty(n, L, dtype=dtype, device=meta, requires_grad=True)
        out, lse = ma.attention_forward(q.detach(), k.detach(), v.detach(), D**-0.5)
        g = torch.empty(n, L, dtype=torch.float32, device=meta)

        def fwd_nograd():
            with torch.no_grad():
                ops.mixblock_attention(q, k, v, backend="triton")

        return {"fwd": lambda: ops.mixblock_attention(q, k, v, backend="triton"), "fwd_nograd": fwd_nograd,
                "bwd": lambda: ma.attention_backward(q, k, v, out, lse, g, D**-0.5)}
    x = torch.empty(n, 3, size, size, dtype=dtype, device=meta).contiguous(memory_format=torch.channels_last)
    logits = torch.empty(n, 1, h, h, dtype=torch.float32, device=meta, requires_grad=True)
    perm = torch.empty(n, dtype=torch.int64, device=meta)
    g = torch.empty_like(x)
    gs = torch.empty(n, dtype=torch.float32, device=meta)

    def fwd_nograd():
        with torch.no_grad():
            ops.mask_mix(logits, x, perm, backend="triton")

    return {"fwd": lambda: ops.mask_mix(logits, x, perm, backend="triton"), "fwd_nograd": fwd_nograd,
            "bwd": lambda: mm.mask_mix_backward(logits, x, perm, "nearest", g, gs)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    p.add_argument("--device", default="cpu", choices=("cpu", "meta"),
                   help="tensors' device (default cpu): on meta, torch's own small ops (s_mean's sum and divide) "
                        "run Python reference code and dominate")
    p.add_argument("--allocator", default="caching", choices=ALLOCATORS,
                   help="caching (default): glibc's malloc set to reuse freed blocks and never map memory per call, "
                        "as the CUDA caching allocator does; system: malloc as it is (large buffers mmap'd per call)")
    p.add_argument("--calls", type=int, default=3000, help="timed calls per measurement (default 3000)")
    p.add_argument("--output", default=None, help="JSON path (default output/bench/host-overhead-cpu-<date>.json)")
    args = p.parse_args(argv)
    if args.allocator == "caching":
        use_caching_allocator()  # before any tensor is allocated
    torch.set_num_threads(1)

    from automix_fast.kernels import launches

    from automix_fast.kernels import mask_mix, mixblock_attention

    rows = []
    with launches.recording() as recorded:
        def bare_launch(kernel, grid, *args, **kwargs):
            recorded.append(kernel)

        for preset in args.presets:
            for dname in args.dtypes:
                for op in ("attention", "mask_mix"):
                    for pass_, fn in op_calls(op, preset, DTYPES[dname], torch.device(args.device)).items():
                        recorded.clear()
                        fn()
                        n_launches = len(recorded)
                        row = dict(op=op, preset=preset, dtype=dname, pass_=pass_, launches=n_launches,
                                   **time_calls(fn, args.calls, recorded))
                        for module in (mask_mix, mixblock_attention):
                            module.launch = bare_launch
                        try:
                            row["bare_median_us"] = time_calls(fn, args.calls, recorded)["median_us"]
                        finally:
                            for module in (mask_mix, mixblock_attention):
                                module.launch = launches.launch
                        rows.append(row)
                        flag = "  over budget" if row["bare_median_us"] > BUDGET_US else ""
                        print(f"{op:10s} {preset:13s} {dname:5s} {pass_:10s} {n_launches} launch(es)  "
                              f"median {row['median_us']:7.2f} us  p90 {row['p90_us']:7.2f} us  "
                              f"bare launch {row['bare_median_us']:7.2f} us{flag}")
    env = environment(torch.device("cpu"))
    allocator = {"caching": "glibc malloc set by mallopt to reuse freed blocks, no mmap, no trimming",
                 "system": "the C library's malloc as configured"}[args.allocator]
    payload = {"benchmark": "host-overhead", "unit": "microseconds per call", "budget_us": BUDGET_US,
               "calls": args.calls, "allocator": args.allocator,
               "method": f"{args.device} tensors, launches recorded (automix_fast.kernels.launches); "
                         f"CPU allocator: {args.allocator} ({allocator})",
               "results": rows}
    path = write_results("host-overhead", env, payload, args.output)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
