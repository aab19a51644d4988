"""Optimizer steps: the eager step, and the static-buffer step that a CUDA graph replays.

`EagerStep.run` is one optimizer step: `accum_steps` micro-batches of the policy's
`forward_backward`, then the (possibly skipped) update and the policy's `after_step`.

`StaticStep.run` computes the same numbers from preallocated device buffers: the batch, the
policy's per-step values (lambdas, permutations, the lam_margin choice, the mask-loss and EMA
weights: `Mixer.static_buffers`, refilled by `Mixer.fill_static` with one or two host->device
copies), the learning rates (tensors in the optimizer's groups, refilled by the schedule), the
gradients, the summed loss and the logged sums; under float16 autocast, GradScaler's loss scale
and growth tracker, which its update changes in place on the device (the fused optimizer takes
the scale and the overflow flag as tensors, so no part of the scaler reads the host). Nothing
in a step branches on a per-step value except which graph runs: steps of one `Mixer.step_kind`
(AutoMix: with or without the Mix Block branch; mixup/cutmix's batch mode: not mixed, mixup or
cutmix) run the same operations, so on CUDA each kind's micro-batch and update are captured
once as CUDA graphs (sharing one memory pool) and replayed; on CPU the same code runs without
capture, which is how the tests hold it equal to the eager step bit for bit. (One difference on
CUDA: torch's fused optimizers read a tensor learning rate as float32 there, a float one as
float64, so the static step's LR is the float32 rounding of the eager step's.)

The first step of each kind runs eagerly: it creates the optimizer's remaining state and names
the parameters that kind gives a gradient (a parameter without one is left out of that kind's
update, as the eager step leaves it; under torchrun every parameter has one, zeros where the
kind gives none, as the eager step all-reduces them). Under torchrun the gradients' all-reduce
is part of the captured update (NCCL collectives can be captured). A batch whose shape, dtype
or layout differs from the buffers' (a last, smaller batch) runs eagerly too; until a graph is
captured the buffers follow the batch instead (a run whose first step is a smaller batch). A
step's micro-batches are all fetched before its first forward (one eager step if any does not
fit).
"""
from __future__ import annotations

import time
from typing import Iterator

import torch

from automix_fast.engine.train_step import StepContext, autocast, nonfinite_flag, optimizer_step
from automix_fast.errors import ConfigError, UserError

CUDA_WARMUP_RUNS = 2  # uncaptured runs of a graph on a side stream before its capture (lazy inits, autotuning)
UNASSIGNED = object()  # no kind's static gradients are assigned (a kind may be None)


class EagerStep:
    """The eager optimizer step and the running sums of the logged values between log reads."""

    def __init__(self, ctx: StepContext):
        self.ctx = ctx
        self.params = [p for g in ctx.optimizer.param_groups for p in g["params"]]
        self.sums: dict[str, torch.Tensor] = {}

    def run(self, step: int, micro: int, batches: Iterator) -> int:
        """Optimizer step `step` over the `micro` (x, y) micro-batches of `batches` (each taken
        just before its forward); returns the images seen."""
        ctx = self.ctx
        ctx.optimizer.zero_grad(set_to_none=True)
        images, loss_sum = 0, None

        def backward(t: torch.Tensor) -> None:
            self.scaled(t / micro if micro > 1 else t).backward()

        for x, y in batches:
            loss, logs = ctx.mixer.forward_backward(x, y, step, ctx.total_steps,
                                                    lambda: autocast(ctx.device, ctx.amp_dtype), backward)
            part = loss / micro if micro > 1 else loss
            loss_sum = part if loss_sum is None else loss_sum + part
            self.add_logs(logs)
            images += x.shape[0]
        self.update(step, loss_sum)
        return images

    def scaled(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss as backward takes it: times float16's loss scale, when there is a scaler (a
        device tensor, which a captured update changes in place, so a replay reads the current scale)."""
        return loss if self.ctx.scaler is None else self.ctx.scaler.scale(loss)

    def add_logs(self, logs: dict) -> None:
        for k, v in logs.items():
            v = v.detach().float().to(self.ctx.device)
            if k in self.sums:
                self.sums[k].add_(v)
            else:
                self.sums[k] = v.clone()

    def reset_sums(self) -> None:
        self.sums = {}

    def update(self, step: int, loss_sum: torch.Tensor) -> None:
        """All-reduce the gradients (torchrun), then the (possibly skipped) update and after_step."""
        self.synced_update(loss_sum, self.ctx.scaler)
        self.ctx.mixer.after_step(step, self.ctx.total_steps)

    def synced_update(self, loss_sum: torch.Tensor, scaler) -> None:
        """The gradients averaged over ranks (torchrun), then the update, skipped on the device
        when the loss or a gradient is not finite."""
        ctx = self.ctx
        bad_loss = nonfinite_flag(loss_sum)
        if ctx.grad_sync is not None:  # once per step: no all-reduce for the first micro-batches
            for p in self.params:  # every rank must all-reduce the same list of tensors
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            # Mean over ranks; a NaN on one rank reaches all. The loss flag rides along, so a
            # non-finite loss on any rank skips the step on every rank and is counted the same.
            ctx.grad_sync([p.grad for p in self.params] + [bad_loss])
        ctx.guard.record(optimizer_step(ctx.optimizer, self.params, ctx.guard, scaler, bad_loss, ctx.clip))


class StaticStep(EagerStep):
    """The step over static device buffers (see the module doc); `capture` (CUDA only) records
    each kind's micro-batch and update as CUDA graphs and replays them."""

    def __init__(self, ctx: StepContext, capture: bool = False):
        super().__init__(ctx)
        check_static(ctx)
        self.capture = capture
        self.mixer = ctx.mixer
        self.buffers: dict | None = None  # the policy's, with x and y, allocated on the first fitting batch
        self.grad_params: dict = {}  # kind -> the parameters its steps give a gradient
        self.grads: dict[torch.Tensor, torch.Tensor] = {}  # parameter -> its static gradient
        self.assigned = UNASSIGNED  # the kind whose static gradients are the parameters' .grad now
        self.loss_sum = torch.zeros((), device=ctx.device)
        self.micro = torch.ones((), device=ctx.device)  # micro-batches in this step (the loss divisor)
        self.graphs: dict = {}
        self.capture_seconds: dict = {}  # key -> host seconds its capture took, until `capture_note` reports it
        self.runs: dict = {}
        self.static_steps = 0  # steps run from the buffers (the others ran eagerly)
        self.pool = torch.cuda.graph_pool_handle() if capture else None
        self.side = torch.cuda.Stream() if capture else None  # the uncaptured warm-up runs' stream
        if capture:  # AdamW's capturable update warns once when it first runs uncaptured: it will be captured
            ctx.optimizer._warned_capturable_if_run_uncaptured = True
        # The schedule refills these in place. CPU fused kernels read a tensor LR as float64, as
        # they read a float one: the same update. CUDA ones read it as float32 (a float LR as
        # float64): there the LR is rounded to float32, a relative change below 6e-8.
        lr_dtype = torch.float32 if ctx.device.type == "cuda" else torch.float64
        for group in ctx.optimizer.param_groups:
            group["lr"] = torch.tensor(float(group["lr"]), dtype=lr_dtype, device=ctx.device)

    def run(self, step: int, micro: int, batches: Iterator) -> int:
        kind = self.mixer.step_kind(step)
        batches = list(batches)  # all fetched first: a batch that does not fit makes the whole step eager
        if self.buffers is not None and not self.graphs and not self.fits(*batches[0]):
            self.buffers, self.runs = None, {}  # nothing captured yet: follow the batch (a first, smaller one)
        if kind not in self.grad_params or not all(self.fits(x, y) for x, y in batches):
            self.assigned = UNASSIGNED  # the eager step sets .grad to None first
            images = super().run(step, micro, iter(batches))
            if kind not in self.grad_params and self.fits(*batches[0]):
                self.record(kind)
            return images
        self.assign(kind)
        self.static_steps += 1
        self.mixer.fill_static(self.buffers, step, self.ctx.total_steps)
        self.micro.fill_(float(micro))
        for x, y in batches:
            self.buffers["x"].copy_(x, non_blocking=True)
            self.buffers["y"].copy_(y, non_blocking=True)
            self.launch(("micro", kind), lambda: self.micro_body(kind))
        self.launch(("update", kind), self.update_body)
        return sum(x.shape[0] for x, _ in batches)

    def fits(self, x: torch.Tensor, y: torch.Tensor) -> bool:
        """Whether a batch fits the buffers (allocating them for the first batch seen)."""
        if self.buffers is None:
            self.buffers = {**self.mixer.static_buffers(x), "x": torch.empty_like(x), "y": torch.empty_like(y)}
        bx, by = self.buffers["x"], self.buffers["y"]
        return (x.shape == bx.shape and x.stride() == bx.stride() and x.dtype == bx.dtype and x.device == bx.device
                and y.shape == by.shape and y.dtype == by.dtype and y.device == by.device)

    def record(self, kind) -> None:
        """After the eager first step of `kind`: the parameters it gave a gradient, each with a
        static gradient (zeros; shared by the kinds); the logged sums exist from now on."""
        self.grad_params[kind] = [p for p in self.params if p.grad is not None]
        for p in self.grad_params[kind]:
            if p not in self.grads:
                self.grads[p] = torch.zeros_like(p)

    def assign(self, kind) -> None:
        """The parameters' .grad as the steps of `kind` read them: static, or None where the eager
        step has none (so the update leaves those parameters alone)."""
        if self.assigned != kind:
            has = set(map(id, self.grad_params[kind]))
            for p in self.params:
                p.grad = self.grads[p] if id(p) in has else None
            self.assigned = kind

    def micro_body(self, kind) -> None:
        """One micro-batch from the buffers: forward, backward into the static gradients, the loss
        and the logged values added to their static sums."""
        ctx = self.ctx
        loss, logs = self.mixer.static_forward_backward(
            self.buffers["x"], self.buffers["y"], self.buffers, kind,
            lambda: autocast(ctx.device, ctx.amp_dtype), lambda t: self.scaled(t / self.micro).backward())
        self.loss_sum.add_(loss / self.micro)
        for k, v in logs.items():
            self.sums[k].add_(v.detach().float())

    def update_body(self) -> None:
        """The update from the static gradients (averaged over ranks under torchrun: every
        parameter has one then, as the eager step gives it), the policy's after_step from its
        buffers, then the gradients and the loss sum zeroed."""
        self.synced_update(self.loss_sum, self.ctx.scaler)
        self.mixer.static_after_step(self.buffers)
        torch._foreach_zero_([p.grad for p in self.params if p.grad is not None])
        self.loss_sum.zero_()

    def reset_sums(self) -> None:
        for v in self.sums.values():  # in place: a captured graph adds into these tensors
            v.zero_()

    def launch(self, key, body) -> None:
        """Run `body`; with capture: eagerly on a side stream for its first runs, then captured
        once and replayed from then on."""
        if not self.capture:
            body()
            return
        graph = self.graphs.get(key)
        if graph is None:
            self.runs[key] = self.runs.get(key, 0) + 1
            if self.runs[key] <= CUDA_WARMUP_RUNS:
                self.side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(self.side):
                    body()
                torch.cuda.current_stream().wait_stream(self.side)
                return
            graph = self.capture_graph(key, body)
        graph.replay()

    def capture_graph(self, key, body) -> "torch.cuda.CUDAGraph":
        graph = torch.cuda.CUDAGraph()
        t0 = time.perf_counter()
        failed = []  # body's own error: a CUDA error invalidates the capture, and capture_end's error then hides it
        stream = torch.cuda.current_stream()
        try:
            # thread_local: a loader's thread may pin memory (a CUDA call) while this one captures
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                try:
                    body()
                except RuntimeError as e:
                    failed.append(e)
                    raise
        except RuntimeError as e:
            torch.cuda.set_stream(stream)  # when capture_end raises, graph's exit leaves the capture stream current
            first = failed[0] if failed else e
            raise UserError(f"--cuda-graph: capturing the {key[0]} part of a step failed: "
                            f"{str(first).splitlines()[0]}; run without --cuda-graph") from first
        self.graphs[key] = graph
        self.capture_seconds[key] = time.perf_counter() - t0
        torch.cuda.empty_cache()  # the eager and warm-up runs' cached blocks: the graphs have their own pool
        return graph

    def capture_note(self) -> str | None:
        """One line on the graphs captured since the last note (None: none was)."""
        if not self.capture_seconds:
            return None
        captured, self.capture_seconds = self.capture_seconds, {}
        kinds = len({kind for _, kind in captured})
        return (f"CUDA graphs: {len(captured)} captured ({kinds} kind{'s' * (kinds != 1)} of step) in "
                f"{sum(captured.values()):.1f} s; replayed from then on ({len(self.graphs)} in all)")


def check_static(ctx: StepContext) -> None:
    """What the static step cannot do, as one error each (the config checks say most of it first)."""
    if not ctx.mixer.static_step:
        raise ConfigError(f"--cuda-graph: the {ctx.mixer.name} policy has no static-buffer step")
    if not all(group.get("fused") for group in ctx.optimizer.param_groups):
        raise ConfigError("--cuda-graph needs torch's fused optimizer (it skips a bad step on the device)")
