"""What the official step's extra k pass costs: k's stages after the Mix Block's stage, run on the
clean batch (no grad) only for k's BN statistics (`k_full_forward`).

    python bench/bench_k_full_forward.py                                  # resnet18_cifar, tinynet, wrn28_8_cifar
    python bench/bench_k_full_forward.py --models resnet50 --img-size 224 -b 64 --device cuda

Two numbers per model:
  - FLOPs (torch.utils.flop_counter, device independent): the extra pass in units of one backbone
    forward, and as a share of the ~8.8 units of an AutoMix step (STEP_UNITS);
  - time: whole AutoMix steps (loss + backward, fp32 reference path) with and without the extra
    pass, interleaved A/B/A/B and the minimum of each taken, so a machine shared with other jobs
    (the 2-core CI box) biases both sides alike.
JSON under bench/results/ (device, versions, commit with the numbers).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write_results  # noqa: E402

from automix_fast.mixing import build_mixer  # noqa: E402
from automix_fast.models import create_model  # noqa: E402

# Backbone forward units per AutoMix step without the extra pass (bench/README.md "The ~2.9 floor").
STEP_UNITS = 8.8


def flops(fn) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    return counter.get_total_flops()


def measure(name: str, args, device) -> dict:
    torch.manual_seed(0)
    model = create_model(name, num_classes=100, mix_head=True).to(device)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
    y = torch.randint(0, 100, (args.batch_size,), device=device)
    full = flops(lambda: model.forward_features(x))
    feat = model.forward_features(x, stages=model.mix_stage).detach()
    after = flops(lambda: model.forward_after(feat, model.mix_stage))
    mixers = {on: build_mixer("automix", model, seed=0, kernel_backend="torch", k_full_forward=on).to(device)
              for on in (True, False)}

    def step(mixer):
        loss, _ = mixer.loss(x, y, 5, 100)
        loss.backward()
        model.zero_grad(set_to_none=True)
        mixer.mix_block.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times = {True: [], False: []}
    for on in (True, False):
        step(mixers[on])  # warm-up
    for _ in range(args.repeats):
        for on in (True, False):
            t0 = time.perf_counter()
            step(mixers[on])
            times[on].append(time.perf_counter() - t0)
    best = {on: min(ts) * 1000 for on, ts in times.items()}
    return {
        "model": name, "mix_stage": model.mix_stage, "forward_gflops": round(full / 1e9, 3),
        "extra_gflops": round(after / 1e9, 3), "extra_forward_units": round(after / full, 3),
        "extra_share_of_step_flops": round(after / full / STEP_UNITS, 4),
        "step_ms_official": round(best[True], 2), "step_ms_k_to_mix_stage": round(best[False], 2),
        "step_time_ratio": round(best[True] / best[False], 3),
        "step_ms_all": {"official": [round(1000 * t, 1) for t in times[True]],
                        "k_to_mix_stage": [round(1000 * t, 1) for t in times[False]]},
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["tinynet", "resnet18_cifar", "wrn28_8_cifar"])
    ap.add_argument("--img-size", type=int, default=32)
    ap.add_argument("-b", "--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--output", default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    rows = []
    for name in args.models:
        row = measure(name, args, device)
        rows.append(row)
        print(f"{name:<16} extra pass {row['extra_forward_units']:.2f} forward units "
              f"({100 * row['extra_share_of_step_flops']:.1f}% of a step's ~{STEP_UNITS} units); "
              f"step {row['step_ms_official']:.1f} ms official vs {row['step_ms_k_to_mix_stage']:.1f} ms "
              f"(x{row['step_time_ratio']:.3f})", flush=True)
    setup = {"img_size": args.img_size, "batch_size": args.batch_size, "repeats": args.repeats}
    path = write_results("k-full-forward", environment(device), {"setup": setup, "results": rows}, args.output)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
