"""Host time of one Mix Block op call: validation, backend choice, buffers, grid and launch.

    python bench/bench_host_overhead.py                 # -> output/bench/host-overhead-cpu-<date>.json
    python bench/bench_host_overhead.py --presets cifar-r18 --calls 500 --output /tmp/host.json

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
"""
from __future__ import annotations

import argparse
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
    p.add_argument("--calls", type=int, default=3000, help="timed calls per measurement (default 3000)")
    p.add_argument("--output", default=None, help="JSON path (default output/bench/host-overhead-cpu-<date>.json)")
    args = p.parse_args(argv)
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
    payload = {"benchmark": "host-overhead", "unit": "microseconds per call", "budget_us": BUDGET_US,
               "calls": args.calls, "method": f"{args.device} tensors, launches recorded (automix_fast.kernels.launches)",
               "results": rows}
    path = write_results("host-overhead", env, payload, args.output)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
