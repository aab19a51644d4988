"""Training-step throughput of vanilla, mixup and automix on synthetic on-device data.

    python bench/bench_train_step.py                                   # tinynet, 32 px, CPU or GPU
    python bench/bench_train_step.py --model resnet50 --img-size 224 -b 256 --configs optimized reference
    python bench/bench_train_step.py --model resnet18_cifar --img-size 32 -b 256 --compile
    python bench/bench_train_step.py --model resnet50 --img-size 224 -b 128 \
        --runs optimized:vanilla optimized:automix compiled:vanilla --profile optimized:automix
    python bench/bench_train_step.py --model resnet18_cifar -b 100 --runs compiled:automix compiled-step:automix

Each step is the engine's own (`automix_fast.engine.train.train_one_epoch`: schedule, autocast,
backward, non-finite guard, fused optimizer, EMA), fed by a loader that hands out batches
already on the device, so loading is measured apart (bench_loader.py). A timed "epoch" is
--steps steps and ends with the loop's own device sync; the median over --repeats epochs is
reported, after one warm-up epoch (compilation, autotuning, allocator; its time is `warmup_s`).
Configurations, side by side in one run:
  optimized: bf16 autocast, channels-last, Triton kernels (on CUDA), fused SGD, eager
             (compiled with --compile): the CUDA default of `automix-fast train`
  compiled:  optimized with torch.compile of the encoders (`--torchcompile`)
  compiled-step: optimized with torch.compile of AutoMix's whole loss step (`--torchcompile
             --torchcompile-scope step`); the baselines' model as `compiled`
  graphed:   optimized with the static-buffer step replayed as CUDA graphs (`--cuda-graph`; on a
             CPU the static step without capture); every mix
  graphed-compiled, graphed-compiled-step: graphed with the code of compiled / compiled-step
             (`--cuda-graph --torchcompile [--torchcompile-scope step]`)
  optimized-fp16, graphed-fp16: optimized / graphed in fp16 autocast with GradScaler (`--amp-dtype
             float16`), on any device; on CUDA BatchNorm then runs cuDNN's kernels (torch sends
             bf16 BatchNorm to its own), the difference these rows measure
  reference: fp32, NCHW, --kernel-backend torch, eager
--runs CONFIG:MIX ... picks (configuration, mix) pairs instead of every --configs x --mixes.
--profile [CONFIG:]MIX ... runs --profile-steps more steps of those runs under torch.profiler:
kernels per step and the GPU-busy share of the step.
The JSON (output/bench/train-step-<device>-<date>.json, or --output), rewritten after every row so
a run stopped part-way keeps what it measured, holds device, versions, commit, img/s, step time,
peak memory, the mixup/vanilla img/s and automix/mixup step time ratios (next to the ~2.9 floor,
bench/README.md "The ~2.9 floor").
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, profile_run, write_results  # noqa: E402

from automix_fast.config import CUDA_GRAPH_MODES  # noqa: E402
from automix_fast.engine.optim import build_optimizer  # noqa: E402
from automix_fast.engine.policy import compile_policy  # noqa: E402
from automix_fast.engine.schedule import build_schedule  # noqa: E402
from automix_fast.engine.static_step import StaticStep  # noqa: E402
from automix_fast.engine.train import EpochCallbacks, EpochPlan, train_one_epoch  # noqa: E402
from automix_fast.engine.train_step import StepContext, StepGuard  # noqa: E402
from automix_fast.mixing import build_mixer  # noqa: E402
from automix_fast.models import create_model  # noqa: E402

FLOOR = 2.9  # bench/README.md "The ~2.9 floor": ~8.8 backbone units per AutoMix step against 3 for mixup
CONFIGS = ("optimized", "compiled", "compiled-step", "graphed", "graphed-compiled", "graphed-compiled-step",
           "optimized-fp16", "graphed-fp16", "reference")
COMPILE_SCOPE = {"compiled": "encoders", "compiled-step": "step", "graphed-compiled": "encoders",
                 "graphed-compiled-step": "step"}  # the --torchcompile-scope of each compiled configuration
MIXES = ("vanilla", "mixup", "cutmix", "automix")


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
        self.steps, self.batch = steps, batch

    @property
    def num_samples(self):
        return self.steps * self.batch

    def __len__(self):
        return self.steps

    def set_epoch(self, epoch):
        pass

    def __iter__(self):
        return (self.batches[i % len(self.batches)] for i in range(self.steps))


def settings(name: str, device: torch.device, compile_: bool) -> dict:
    """The configuration's settings; `compile` is False or the --torchcompile-scope it compiles."""
    cuda = device.type == "cuda"
    if name != "reference":
        scope = COMPILE_SCOPE.get(name, "encoders" if name == "optimized" and compile_ else False)
        amp = torch.float16 if name.endswith("-fp16") else torch.bfloat16 if cuda else None
        return {"amp_dtype": amp, "channels_last": cuda, "kernel_backend": "auto",
                "compile": scope, "static": name.startswith("graphed")}
    return {"amp_dtype": None, "channels_last": False, "kernel_backend": "torch", "compile": False}


# Named variants of AutoMix that change what the step computes (not the official step):
# automix-k-to-mix-stage runs k only up to the Mix Block's stage on the clean batch (the difference
# to "automix" is the cost of k's remaining stages, `k_full_forward`); automix-q-batched runs q's
# two passes as one over both batches (`q_batched`).
VARIANTS = {"automix-k-to-mix-stage": ("automix", {"k_full_forward": False}),
            "automix-q-batched": ("automix", {"q_batched": True})}


def measure(mix: str, cfg: dict, args, device, profile: bool = False, trace: Path | None = None) -> dict:
    """One row: img/s, step times, warm-up time, peak memory and, when `profile`, the profile
    (its trace kept gzipped at `trace` when given).

    Peak memory (`peak_mib`, CUDA) is torch.cuda.max_memory_allocated() over the timed epochs
    (graphed rows: the warm-up epoch too, where their graphs are captured; `peak_scope`) minus
    what was allocated before this row built its model (`base_mib`): the model, optimizer state,
    batches and the step's own peak."""
    policy, extra = VARIANTS.get(mix, (mix, {}))
    cuda = device.type == "cuda"
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)  # a graphed row's peak must not include an earlier row's
    torch.manual_seed(0)
    model = create_model(args.model, num_classes=args.num_classes, mix_head=policy == "automix").to(device)
    if cfg["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    mixer = build_mixer(policy, model, kernel_backend=cfg["kernel_backend"], seed=0, **extra).to(device)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    if cfg["compile"]:  # as `automix-fast train --torchcompile --torchcompile-scope SCOPE` does
        compile_policy(mixer, args.compile_backend, mode=args.compile_mode, scope=cfg["compile"])
    groups = mixer.param_groups(0.1, 1e-4)
    opt = build_optimizer(groups, "sgd", lr=0.1, momentum=0.9, weight_decay=1e-4, device=device,
                          fused=cfg.get("static", False))
    profile_steps = args.profile_steps if profile else 0
    # One schedule length for every row, profiled or not: rows of one mix train the same steps,
    # so their weights can be compared (weights_sq_sum).
    total = (args.repeats + 1) * args.steps + args.profile_steps
    sched = build_schedule("cosine", [g["lr"] for g in groups], total_steps=total, steps_per_epoch=args.steps)
    dtype = (cfg["amp_dtype"] if cuda else None) or torch.float32  # the loaders' image dtype: autocast's on CUDA
    loader = SyntheticLoader(args.steps, args.batch_size, args.img_size, args.num_classes, device, dtype, cfg["channels_last"])
    guard = StepGuard(device)

    scaler = torch.amp.GradScaler(device.type) if cfg["amp_dtype"] == torch.float16 else None
    ctx = StepContext(mixer, opt, sched, guard, total, amp_dtype=cfg["amp_dtype"], scaler=scaler)
    if cfg.get("static"):  # as `automix-fast train --cuda-graph`: one static step for the whole run
        ctx.stepper = StaticStep(ctx, capture=cuda)

    def epoch(e, start):
        return train_one_epoch(ctx, loader, EpochPlan(epoch=e, start_step=start),
                               EpochCallbacks(log_interval=loader.steps))

    t0 = time.perf_counter()
    epoch(0, 0)  # warm-up: compilation, autotuning, allocator
    warmup_s = time.perf_counter() - t0
    warmup_graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs
    if cuda and not cfg.get("static"):
        # A graphed row's activations are allocated while its graphs are captured (in the warm-up
        # epoch) and never again by a replay: its peak spans the warm-up too (`peak_scope`).
        torch.cuda.reset_peak_memory_stats(device)
    seconds = [epoch(1 + r, (1 + r) * args.steps).seconds for r in range(args.repeats)]
    step_ms = 1000 * statistics.median(seconds) / args.steps
    row = {
        "mix": mix, "step_ms": round(step_ms, 3), "img_per_s": round(args.batch_size / step_ms * 1000, 1),
        "step_ms_all": [round(1000 * s / args.steps, 3) for s in seconds], "warmup_s": round(warmup_s, 3),
        "compile": cfg["compile"], "skipped_steps": int(guard.skipped.item()),
        "amp_dtype": str(cfg["amp_dtype"]).removeprefix("torch.") if cfg["amp_dtype"] else None,
    }
    if scaler is not None:
        row["loss_scale"] = scaler.get_scale()  # GradScaler's scale after the timed epochs
    if cfg.get("static"):  # steps run from the buffers (the first of each kind runs eagerly)
        row["static_steps"] = ctx.stepper.static_steps
    # Every row starts from the same weights and batches: rows of one mix that train the same steps
    # end with close weights (a --cuda-graph replay that read a stale buffer would not).
    row["weights_projection"], row["weights_norm"] = weights_signature(list(mixer.parameters()))
    if cfg["compile"]:
        # Graphs compiled in the warm-up epoch and in the timed ones (a compile there, e.g. the
        # first plain-mixup step of AutoMix's compiled step, is in the timings: see step_ms_all).
        row["graphs"] = [warmup_graphs, torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs - warmup_graphs]
    if cuda:
        row["peak_mib"] = round((torch.cuda.max_memory_allocated(device) - base) / 2**20, 1)
        row["base_mib"] = round(base / 2**20, 1)
        row["peak_scope"] = "warm-up and timed epochs" if cfg.get("static") else "timed epochs"
    if profile_steps:
        loader.steps = profile_steps
        try:
            prof = profile_run(lambda: epoch(1 + args.repeats, (1 + args.repeats) * args.steps), device, profile_steps,
                               keep=trace)
        except Exception as exc:  # a profiler failure keeps the row's timings
            prof = {"error": f"{type(exc).__name__}: {str(exc)[:500]}"}
        else:
            busy = prof["busy_ms_per_step"]
            # The profiler slows the host side (each launch is recorded), so the share is taken against
            # the unprofiled step time; busy_share_in_trace is the same against the profiled wall time.
            prof["gpu_busy_share"] = None if busy is None else round(min(1.0, busy / step_ms), 4)
        row["profile"] = prof
    if cfg["compile"]:
        torch._dynamo.reset()  # the next row compiles its own model; free this one's graphs
    return row


@torch.no_grad()
def weights_signature(params: list[torch.Tensor], k: int = 4) -> tuple[list[float], float]:
    """(k projections of all the weights on fixed Gaussian directions, their L2 norm): for two runs
    of one model, max |a_i - b_i| / norm estimates the relative distance between their weights."""
    device = params[0].device
    g = torch.Generator(device=device).manual_seed(0)
    proj = torch.zeros(k, dtype=torch.float64, device=device)
    sq = torch.zeros((), dtype=torch.float64, device=device)
    for p in params:
        w = p.detach().double().flatten()
        proj += torch.randn(k, w.numel(), generator=g, device=device, dtype=torch.float64) @ w
        sq += w.pow(2).sum()
    return proj.tolist(), float(sq.sqrt())


def parse_runs(ap: argparse.ArgumentParser, args) -> list[tuple[str, str]]:
    """(config, mix) pairs: --runs when given, else every --configs x --mixes."""
    if not args.runs:
        return [(c, m) for c in args.configs for m in args.mixes]
    pairs = []
    for item in args.runs:
        config, _, mix = item.partition(":")
        if config not in CONFIGS or mix not in (*MIXES, *VARIANTS):
            ap.error(f"--runs {item!r}: expected CONFIG:MIX with CONFIG in {', '.join(CONFIGS)} "
                     f"and MIX in {', '.join((*MIXES, *VARIANTS))}")
        pairs.append((config, mix))
    return pairs


def measured(row: dict) -> bool:
    """Whether a row holds a measurement (not an error, not skipped for time)."""
    return "error" not in row and "skipped" not in row


def ratios(rows: list[dict]) -> tuple[dict, dict]:
    """Per configuration: automix/mixup step time and mixup/vanilla img/s, where both rows exist."""
    automix_mixup, mixup_vanilla = {}, {}
    for name in dict.fromkeys(r["config"] for r in rows):
        by_mix = {r["mix"]: r for r in rows if r["config"] == name and measured(r)}
        if "automix" in by_mix and "mixup" in by_mix:
            automix_mixup[name] = round(by_mix["automix"]["step_ms"] / by_mix["mixup"]["step_ms"], 3)
        if "mixup" in by_mix and "vanilla" in by_mix:
            mixup_vanilla[name] = round(by_mix["mixup"]["img_per_s"] / by_mix["vanilla"]["img_per_s"], 3)
    return automix_mixup, mixup_vanilla


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tinynet")
    ap.add_argument("--img-size", type=int, default=32)
    ap.add_argument("-b", "--batch-size", type=int, default=64)
    ap.add_argument("--num-classes", type=int, default=100)
    ap.add_argument("--mixes", nargs="+", default=["vanilla", "mixup", "automix"], choices=[*MIXES, *VARIANTS])
    ap.add_argument("--configs", nargs="+", default=["optimized"], choices=CONFIGS)
    ap.add_argument("--runs", nargs="+", default=None, metavar="CONFIG:MIX",
                    help="(configuration, mix) pairs to run, in this order, instead of every --configs x --mixes")
    ap.add_argument("--compile", action="store_true", help="torch.compile the encoders in the optimized configuration")
    ap.add_argument("--compile-backend", default="inductor", help="torch.compile backend of the compiled rows")
    ap.add_argument("--compile-mode", default=None,
                    help="torch.compile mode of the compiled rows (inductor: reduce-overhead captures CUDA graphs)")
    ap.add_argument("--steps", type=int, default=10, help="steps per timed epoch")
    ap.add_argument("--repeats", type=int, default=5, help="timed epochs; the median is reported")
    ap.add_argument("--profile", nargs="+", default=[], metavar="[CONFIG:]MIX",
                    help="profile these runs (a bare MIX: in every configuration) for --profile-steps steps after the timed epochs")
    ap.add_argument("--profile-steps", type=int, default=3)
    ap.add_argument("--trace-dir", default=None, help="keep the profiler traces here (gzipped chrome traces)")
    ap.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                    help="start no row after this many seconds from the first row's start: the rest are recorded "
                         "as skipped (a stage with a time limit keeps its status)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--output", default=None, help="JSON path (default output/bench/train-step-<device>-<date>.json)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":  # cuDNN's autotuned algorithms, as `automix-fast train` on CUDA (not --deterministic)
        torch.backends.cudnn.benchmark = True
    runs = parse_runs(ap, args)
    if args.compile_mode in CUDA_GRAPH_MODES and any(c.startswith("graphed-compiled") for c, _ in runs):
        ap.error(f"--compile-mode {args.compile_mode} captures CUDA graphs of its own: the graphed-compiled rows "
                 "cannot run with it")

    env = environment(device)
    setup = {k: getattr(args, k) for k in ("model", "img_size", "batch_size", "num_classes", "steps", "repeats", "compile",
                                           "compile_backend", "compile_mode", "profile_steps")}
    setup["runs"] = [f"{c}:{m}" for c, m in runs]
    setup["cudnn_benchmark"] = torch.backends.cudnn.benchmark
    rows: list[dict] = []

    def save():
        automix_mixup, mixup_vanilla = ratios(rows)
        return write_results("train-step", env, {"setup": setup, "floor": FLOOR, "automix_mixup_ratio": automix_mixup,
                                                 "mixup_vanilla_ratio": mixup_vanilla, "results": rows}, args.output)

    started = time.perf_counter()
    for name, mix in runs:
        cfg = settings(name, device, args.compile)
        if args.time_budget is not None and time.perf_counter() - started > args.time_budget:
            rows.append({"config": name, "mix": mix, "skipped": f"not started: past the {args.time_budget:g} s budget"})
            print(f"{name:<15} {mix:<8} skipped ({rows[-1]['skipped']})", flush=True)
            path = save()
            continue
        profile = mix in args.profile or f"{name}:{mix}" in args.profile
        trace = Path(args.trace_dir) / f"trace-{args.model}-{name}-{mix}.json.gz" if profile and args.trace_dir else None
        try:
            row = {"config": name, **measure(mix, cfg, args, device, profile, trace)}
        except Exception as exc:  # one failing row (a compile error, out of memory) must not lose the others
            row = {"config": name, "mix": mix, "error": f"{type(exc).__name__}: {str(exc)[:500]}"}
            print(f"{name:<15} {mix:<8} error: {row['error'][:120]}", flush=True)
            if cfg["compile"]:
                torch._dynamo.reset()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        else:
            prof = row.get("profile")
            prof = prof if prof and prof.get("kernels_per_step") is not None else None
            print(f"{name:<15} {mix:<8} {row['step_ms']:>9.2f} ms/step {row['img_per_s']:>9.1f} img/s"
                  + (f" {row['peak_mib']:>9.0f} MiB" if "peak_mib" in row else "")
                  + (f"  warm-up {row['warmup_s']:.1f} s, graphs {row['graphs'][0]} + {row['graphs'][1]} timed"
                     if cfg["compile"] else "")
                  + (f"  {prof['kernels_per_step']} kernels/step, GPU busy {prof['gpu_busy_share']:.0%}"
                     if prof else ""), flush=True)
        rows.append(row)
        path = save()
    automix_mixup, mixup_vanilla = ratios(rows)
    for name, r in automix_mixup.items():
        print(f"{name}: automix/mixup step time {r:.2f} (floor ~{FLOOR})")
    for name, r in mixup_vanilla.items():
        print(f"{name}: mixup/vanilla img/s {r:.2f}")
    ok = [r for r in rows if measured(r)]
    opt = {r["mix"]: r for r in ok if r["config"] == "optimized"}
    ref = {r["mix"]: r for r in ok if r["config"] == "reference"}
    for mix in opt.keys() & ref.keys():
        print(f"{mix}: optimized / reference img/s = {opt[mix]['img_per_s'] / ref[mix]['img_per_s']:.2f}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
