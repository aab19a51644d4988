"""Peak memory of one training step per mixing policy, on CPU or CUDA, written as JSON.

    python bench/bench_memory.py --model resnet50 --img-size 224 --batch-size 32   # CPU: a few minutes
    python bench/bench_memory.py --device cuda --model resnet50 --img-size 224 --batch-size 128

Each row is one optimizer step (forward, backward, update, after_step) of the engine's policy
objects, after a first step that made the gradients and the optimizer's state: the figure is
what the step allocates on top of what it starts with (its activations, its mixed batches, its
gradients). On CUDA that is torch.cuda.max_memory_allocated() minus the allocation before the
step; on CPU the running total of the allocations torch.profiler reports while the step runs
(profile_memory=True), so both count tensors, not the allocator's caches. Rows:

- vanilla, mixup: the baselines' step;
- automix: AutoMix's step as the engine runs it (`forward_backward`: the Mix Block branch, q's
  clean pass and q's mixed pass each backpropagated before the next is built);
- automix-one-backward: the same loss backpropagated once at the end (all three backbone
  graphs alive together), the peak the part-by-part backward removes;
- automix-q-batched: AutoMix with `--q-batched` (q's two passes as one over both batches, so
  both of q's graphs are alive together; a named option, not the official step).

The ratios of every automix row to mixup (`automix/mixup`, ...) are the figures to compare with
the target (AutoMix within 2.2x mixup at ResNet-50 224 px b128).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write_results  # noqa: E402

from automix_fast.engine.optim import build_optimizer  # noqa: E402
from automix_fast.mixing import build_mixer  # noqa: E402
from automix_fast.models import create_model  # noqa: E402

ROWS = ("vanilla", "mixup", "automix", "automix-one-backward", "automix-q-batched")


def make_step(row: str, model_name: str, batch: int, img_size: int, device, amp_dtype, channels_last: bool):
    """(step(), parameters) for `row`: one optimizer step on a fixed synthetic batch."""
    torch.manual_seed(0)
    policy = "automix" if row.startswith("automix") else row
    model = create_model(model_name, num_classes=100, mix_head=policy == "automix").to(device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    mixer = build_mixer(policy, model, seed=0, q_batched=row == "automix-q-batched").to(device)
    mixer.train()
    optimizer = build_optimizer(mixer.param_groups(0.1, 1e-4), "sgd", lr=0.1, momentum=0.9, device=device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, img_size, img_size, generator=g).to(device).contiguous(memory_format=fmt)
    y = torch.randint(0, 100, (batch,), generator=g).to(device)

    def autocast():
        return torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()

    def step(i: int) -> None:
        if row == "automix-one-backward":
            with autocast():
                loss, _ = mixer.loss(x, y, i, 100)
            loss.backward()
        else:
            mixer.forward_backward(x, y, i, 100, autocast, lambda t: t.backward())
        optimizer.step()
        mixer.after_step(i, 100)

    return step, optimizer


def cpu_peak(fn) -> int:
    """The most bytes allocated at once while fn() runs (net of what it frees), from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text()).get("traceEvents", [])
    totals = [e["args"]["Total Allocated"] for e in events
              if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type") == 0]
    return max(totals, default=0)


def measure(row: str, args, device, amp_dtype) -> dict:
    step, optimizer = make_step(row, args.model, args.batch_size, args.img_size, device, amp_dtype, args.channels_last)
    step(0)  # the gradients and the optimizer's state exist from now on, as in every later step
    # Step 2 trains the Mix Block (every step does by default); a step skipping it peaks lower.
    optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step(2)
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        peak = cpu_peak(lambda: step(2))
    return {"row": row, "peak_mib": round(peak / 2**20, 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default="resnet18_cifar")
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--amp-dtype", default="bfloat16", choices=("bfloat16", "float16", "none"))
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    p.add_argument("--output", default=None, help="JSON path (default output/bench/memory-<device>-<date>.json)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    amp_dtype = None if args.amp_dtype == "none" else getattr(torch, args.amp_dtype)
    rows = []
    for row in args.rows:
        rows.append(measure(row, args, device, amp_dtype))
        print(f"{row:<22} {rows[-1]['peak_mib']:>10.1f} MiB", flush=True)
    peaks = {r["row"]: r["peak_mib"] for r in rows}
    ratios = {f"{a}/mixup": round(peaks[a] / peaks["mixup"], 3)
              for a in peaks if a.startswith("automix") and peaks.get("mixup")}
    for k, v in ratios.items():
        print(f"{k:<28} {v:.2f}x")
    config = {k: getattr(args, k) for k in ("model", "img_size", "batch_size", "amp_dtype", "channels_last")}
    path = write_results("memory", environment(device), {"config": config, "rows": rows, "ratios": ratios}, args.output)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
