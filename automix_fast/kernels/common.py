"""What the kernel modules share: buffer allocation, tile-size and dtype helpers, layout tests.

This module does not import triton at import time: the dispatcher (`automix_fast.ops`) and
the torch reference use `triton_interpret` and `is_channels_last` without triton installed.

    POISON_OUTPUTS          test hook: every kernel-filled buffer starts full of NaN
    new_strided(...)        a buffer a kernel fills (uninitialised, or NaN under the hook)
    layout(shape, fmt)      the strides torch.empty gives `shape` in memory format `fmt`
    remember(cache, k, v)   cache[k] = v in a per-signature plan cache of bounded size
    needs_autograd(*ts)     whether an op on ts must go through its autograd.Function
    first_order_only(...)   a kernel backward's gradients, made to raise if differentiated again
    triton_interpret()      True when TRITON_INTERPRET asks for triton's CPU interpreter
    pow2(x, lo, hi)         the next power of two >= x, clamped to [lo, hi]
    cdiv(a, b)              ceil(a / b) for ints (triton.cdiv, without its per-call wrapper cost)
    tl_dtype(dtype)         the triton dtype of a float32 / float16 / bfloat16 torch dtype
    is_channels_last(x)     a 4-d tensor laid out NHWC (and not also plainly contiguous)
    OP_NAMESPACE            the torch.library namespace of the kernels' custom ops
    op_registered(name)     whether OP_NAMESPACE::name is already defined (a module re-import)
    define_op(...)          OP_NAMESPACE::name as a torch custom op with its fake (shape-only) twin
"""
from __future__ import annotations

import os

import torch
import torch.autograd.forward_ad as _forward_ad

__all__ = ["POISON_OUTPUTS", "new_strided", "layout", "remember", "needs_autograd", "first_order_only", "triton_interpret",
           "pow2", "cdiv", "tl_dtype", "is_channels_last", "OP_NAMESPACE", "op_registered", "define_op"]

OP_NAMESPACE = "automix_fast"  # torch.ops.automix_fast.<op>: the kernels as torch custom ops

# Test hook: when True every buffer a kernel is meant to fill is allocated full of NaN, so an
# element a kernel forgets to write shows up as NaN instead of as stale memory.
POISON_OUTPUTS = False


def new_strided(shape, stride, dtype: torch.dtype, device) -> torch.Tensor:
    """An uninitialised tensor with the given strides (see `layout`) for a kernel to fill; full of
    NaN while POISON_OUTPUTS is set. torch.empty_strided is the cheapest allocation call."""
    t = torch.empty_strided(shape, stride, dtype=dtype, device=device)
    return t.fill_(float("nan")) if POISON_OUTPUTS else t


def layout(shape, memory_format=torch.contiguous_format) -> tuple:
    """The strides of torch.empty(shape, memory_format=memory_format) (a meta tensor: no memory)."""
    return torch.empty(shape, device="meta", memory_format=memory_format).stride()


# Launchers keep the host work that depends only on a call's signature (shapes, strides, dtypes,
# mode) -- tile sizes, grid, scalar arguments, buffer layouts -- in a dict per launcher, keyed on
# that signature; a repeated signature (every training step) skips it. At most PLAN_CACHE_SIZE
# signatures a launcher: a full cache is emptied and refilled.
PLAN_CACHE_SIZE = 256


def remember(cache: dict, key, plan):
    """cache[key] = plan (emptying `cache` first when it holds PLAN_CACHE_SIZE plans); returns plan."""
    if len(cache) >= PLAN_CACHE_SIZE:
        cache.clear()
    cache[key] = plan
    return plan


def needs_autograd(*tensors: torch.Tensor) -> bool:
    """Whether an op on `tensors` must run through its autograd.Function: grad mode is on and
    one of them requires grad, or a forward-AD level or torch.func transform is active (they see
    the Function). Otherwise the Function would record nothing, so the launcher runs directly."""
    if torch.is_grad_enabled():
        for t in tensors:
            if t.requires_grad:
                return True
    return torch._C._are_functorch_transforms_active() or _forward_ad._current_level >= 0


class _FirstOrderOnly(torch.autograd.Function):
    """The identity on a kernel backward's gradients, recorded as a function of the tensors they
    depend on (passed after them): a second backward towards those tensors runs this node and raises."""

    @staticmethod
    def forward(ctx, op: str, n: int, *tensors):
        ctx.op = op
        return tensors[:n]

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(f"{ctx.op}: the Triton backward is first-order only; for gradients of its gradients "
                           "use backend='torch'")


def first_order_only(op: str, grads: tuple, depends_on: tuple) -> tuple:
    """`grads` (None where not computed), as a kernel op's autograd.Function backward returns them,
    given the tensors they are a function of (its saved inputs and incoming gradients; None allowed).

    The kernels' gradients carry no autograd graph, so under create_graph=True a second backward
    would see them as constants and leave out every second-order term through the op. Where one of
    `depends_on` requires grad, they are returned through a node linked to those tensors that raises
    when a backward reaches it. (torch.autograd.function.once_differentiable is not enough: its error
    node is linked to none of them, so a backward with `inputs` that also reach them another way skips
    it, and it adds none when the incoming gradients do not require grad, as for a loss linear in the
    op's output.) Otherwise `grads` as they are. Call it where grad mode is on (create_graph=True)."""
    linked = [t for t in depends_on if t is not None and t.requires_grad]
    present = [d for d in grads if d is not None]
    if not linked or not present:
        return grads
    passed = iter(_FirstOrderOnly.apply(op, len(present), *present, *linked))
    return tuple(None if d is None else next(passed) for d in grads)


# The values of TRITON_INTERPRET that turn triton's interpreter on, compared case-insensitively and
# unstripped, as triton's own getenv_bool does; any other value (or none) leaves it off.
TRITON_TRUE = ("1", "true", "yes", "on", "y")


def triton_interpret() -> bool:
    """True when TRITON_INTERPRET turns triton's CPU interpreter on, read as triton reads it."""
    return os.environ.get("TRITON_INTERPRET", "").lower() in TRITON_TRUE


def pow2(x: int, lo: int = 1, hi: int | None = None) -> int:
    """The smallest power of two >= x (triton.next_power_of_2), then clamped to [lo, hi]."""
    p = 1 << max(int(x) - 1, 0).bit_length()
    p = max(lo, p)
    return p if hi is None else min(hi, p)


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for positive ints, as triton.cdiv (a constexpr function there: ~us a host call)."""
    return -(-a // b)


def tl_dtype(dtype: torch.dtype):
    """tl.float32 / tl.float16 / tl.bfloat16 for the matching torch dtype (KeyError otherwise)."""
    import triton.language as tl

    return {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[dtype]


def is_channels_last(x: torch.Tensor) -> bool:
    """True when a 4-d tensor is laid out NHWC (and not also plainly contiguous, as C == 1 is)."""
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def op_registered(name: str) -> bool:
    """True when the custom op OP_NAMESPACE::name is already defined in this process, so a
    kernel module imported a second time (importlib.reload) does not define it again."""
    return hasattr(getattr(torch.ops, OP_NAMESPACE), name)


def define_op(name: str, schema: str, impl, fake):
    """Define OP_NAMESPACE::name (`schema`, no mutated arguments) as a torch custom op running
    `impl`, with `fake` giving the outputs' shapes, dtypes and layouts for tracing; returns the
    op (for `register_autograd`)."""
    op = torch.library.custom_op(f"{OP_NAMESPACE}::{name}", impl, mutates_args=(), schema=schema)
    op.register_fake(fake)
    return op
