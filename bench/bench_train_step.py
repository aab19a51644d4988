"""Training-step throughput of vanilla, mixup and automix on synthetic on-device data.

    python bench/bench_train_step.py                                   # tinynet, 32 px, CPU or GPU
    python bench/bench_train_step.py --model resnet50 --img-size 224 -b 256 --configs optimized reference
    python bench/bench_train_step.py --model resnet18_cifar --img-size 32 -b 256 --compile

Each step is the engine's own (`automix_fast.engine.train.train_one_epoch`: schedule, autocast,
backward, non-finite guard, fused optimizer, EMA), fed by a loader that hands out batches
already on the device, so loading is measured apart (bench_loader.py). A timed "epoch" is
--steps steps and ends with the loop's own device sync; the median over --repeats epochs is
reported. Configurations, side by side in one run:
  optimized: bf16 autocast, channels-last, Triton kernels (on CUDA), fused SGD, optional compile
  reference: fp32, NCHW, --kernel-backend torch, eager
The JSON (output/bench/train-step-<device>-<date>.json, or --output) holds device, versions, commit,
img/s, step time, peak memory, and the automix/mixup time ratio next to the ~2.9 floor (bench/README.md, "The ~2.9 floor").
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write_results  # noqa: E402

from automix_fast.engine.optim import build_optimizer  # noqa: E402
from automix_fast.engine.schedule import build_schedule  # noqa: E402
from automix_fast.engine.train import EpochCallbacks, EpochPlan, StepContext, StepGuard, train_one_epoch  # noqa: E402
from automix_fast.mixing import build_mixer  # noqa: E402
from automix_fast.models import create_model  # noqa: E402

FLOOR = 2.9  # bench/README.md "The ~2.9 floor": ~8.8 backbone units per AutoMix step against 3 for mixup


class SyntheticLoader:
    """`steps` batches per epoch, cycling through a few pre-made on-device batches."""

    def __init__(self, steps, batch, img_size, classes, device, dtype, channels_last, pool=4):
        g = torch.Generator().manual_seed(0)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.batches = [
            (
                torch.randn(batch, 3, img_size, img_size, generator=g).to(device=device, dtype=dtype).contiguous(memory_format=fmt),
                torch.randint(0, classes, (batch,), generator=g).to(device),
            )
            for _ in range(pool)
        ]
        self.steps = steps
        self.num_samples = steps * batch

    def __len__(self):
        return self.steps

    def set_epoch(self, epoch):
        pass

    def __iter__(self):
        return (self.batches[i % len(self.batches)] for i in range(self.steps))


def settings(name: str, device: torch.device, compile_: bool) -> dict:
    cuda = device.type == "cuda"
    if name == "optimized":
        return {"amp_dtype": torch.bfloat16 if cuda else None, "channels_last": cuda, "kernel_backend": "auto", "compile": compile_}
    return {"amp_dtype": None, "channels_last": False, "kernel_backend": "torch", "compile": False}


# AutoMix with k run only up to the Mix Block's stage on the clean batch (not the official step):
# the difference to "automix" is the cost of k's remaining stages (`k_full_forward`).
VARIANTS = {"automix-k-to-mix-stage": ("automix", {"k_full_forward": False})}


def measure(mix: str, cfg: dict, args, device) -> dict:
    policy, extra = VARIANTS.get(mix, (mix, {}))
    torch.manual_seed(0)
    model = create_model(args.model, num_classes=args.num_classes, mix_head=policy == "automix").to(device)
    if cfg["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    mixer = build_mixer(policy, model, kernel_backend=cfg["kernel_backend"], seed=0, **extra).to(device)
    if cfg["compile"]:
        model.compile()
        if mixer.momentum_encoder is not None:
            mixer.momentum_encoder.compile()
    groups = mixer.param_groups(0.1, 1e-4)
    opt = build_optimizer(groups, "sgd", lr=0.1, momentum=0.9, weight_decay=1e-4, device=device)
    total = (args.repeats + 1) * args.steps
    sched = build_schedule("cosine", [g["lr"] for g in groups], total_steps=total, steps_per_epoch=args.steps)
    dtype = cfg["amp_dtype"] or torch.float32
    loader = SyntheticLoader(args.steps, args.batch_size, args.img_size, args.num_classes, device, dtype, cfg["channels_last"])
    guard = StepGuard(device)

    def epoch(e):
        ctx = StepContext(mixer, opt, sched, guard, total, amp_dtype=cfg["amp_dtype"])
        return train_one_epoch(ctx, loader, EpochPlan(epoch=e, start_step=e * args.steps),
                               EpochCallbacks(log_interval=args.steps))

    epoch(0)  # warm-up: compilation, autotuning, allocator
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = [epoch(1 + r).seconds for r in range(args.repeats)]
    step_ms = 1000 * statistics.median(seconds) / args.steps
    row = {
        "mix": mix, "step_ms": round(step_ms, 3), "img_per_s": round(args.batch_size / step_ms * 1000, 1),
        "step_ms_all": [round(1000 * s / args.steps, 3) for s in seconds],
        "skipped_steps": int(guard.skipped.item()),
    }
    if device.type == "cuda":
        row["peak_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tinynet")
    ap.add_argument("--img-size", type=int, default=32)
    ap.add_argument("-b", "--batch-size", type=int, default=64)
    ap.add_argument("--num-classes", type=int, default=100)
    ap.add_argument("--mixes", nargs="+", default=["vanilla", "mixup", "automix"], choices=["vanilla", "mixup", "cutmix", "automix", *VARIANTS])
    ap.add_argument("--configs", nargs="+", default=["optimized"], choices=["optimized", "reference"])
    ap.add_argument("--compile", action="store_true", help="torch.compile the encoders in the optimized configuration")
    ap.add_argument("--steps", type=int, default=10, help="steps per timed epoch")
    ap.add_argument("--repeats", type=int, default=5, help="timed epochs; the median is reported")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--output", default=None, help="JSON path (default output/bench/train-step-<device>-<date>.json)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)

    rows = []
    for name in args.configs:
        cfg = settings(name, device, args.compile)
        for mix in args.mixes:
            row = {"config": name, **measure(mix, cfg, args, device)}
            rows.append(row)
            print(f"{name:<10} {mix:<8} {row['step_ms']:>9.2f} ms/step {row['img_per_s']:>9.1f} img/s"
                  + (f" {row['peak_mib']:>9.0f} MiB" if "peak_mib" in row else ""), flush=True)
    ratios = {}
    for name in args.configs:
        by_mix = {r["mix"]: r for r in rows if r["config"] == name}
        if "automix" in by_mix and "mixup" in by_mix:
            ratios[name] = round(by_mix["automix"]["step_ms"] / by_mix["mixup"]["step_ms"], 3)
            print(f"{name}: automix/mixup step time {ratios[name]:.2f} (floor ~{FLOOR})")
    if "optimized" in args.configs and "reference" in args.configs:
        opt = {r["mix"]: r for r in rows if r["config"] == "optimized"}
        ref = {r["mix"]: r for r in rows if r["config"] == "reference"}
        for mix in opt:
            print(f"{mix}: optimized / reference img/s = {opt[mix]['img_per_s'] / ref[mix]['img_per_s']:.2f}")
    setup = {k: getattr(args, k) for k in ("model", "img_size", "batch_size", "num_classes", "steps", "repeats", "compile")}
    path = write_results("train-step", environment(device), {"setup": setup, "floor": FLOOR, "automix_mixup_ratio": ratios, "results": rows}, args.output)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
