"""Public ops of the Mix Block: validate the arguments, pick a backend, call it.

    ops.mixblock_attention(q, k, v, scale=None, *, backend="auto") -> (N, L) float32
    ops.mask_mix(logits, x, perm, *, mode="nearest", backend="auto") -> (x_mix, s_mean)

backend: "auto" runs the Triton kernels on CUDA tensors (or on CPU tensors when
TRITON_INTERPRET=1) and the torch reference otherwise; "triton" and "torch" force one.
The Triton kernels' gradients are first-order only: differentiating them again (after
create_graph=True) raises; the torch reference has higher orders.
The Triton kernel modules (which import triton) are imported on first use, never at import
time; `automix_fast.kernels.launches` and `automix_fast.kernels.common` do not import triton.
"""
from __future__ import annotations

import torch

from automix_fast.config.sections import KERNEL_BACKENDS, MASK_MODES
from automix_fast.kernels import launches
from automix_fast.kernels.common import triton_interpret

from . import reference

BACKENDS, MODES = KERNEL_BACKENDS, MASK_MODES
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

__all__ = ["mixblock_attention", "mask_mix", "resolve_backend", "triton_available", "triton_interpret",
           "BACKENDS", "MODES", "reference"]


_triton_found: bool | None = None  # whether triton imports; looked up on the first call (a plain
# global, not functools.cache: dynamo warns about tracing through a cache wrapper)


def triton_available() -> bool:
    global _triton_found
    if _triton_found is None:
        try:
            import triton  # noqa: F401
        except ImportError:
            _triton_found = False
        else:
            _triton_found = True
    return _triton_found


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend that will run for tensors on `device`: "triton" or "torch"."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    # While launches are recorded (bench/aot_compile.py) nothing runs, so any device will do.
    recording = launches.active() is not None
    usable = device.type == "cuda" or (device.type == "cpu" and triton_interpret()) or recording
    if backend == "auto":
        return "triton" if usable and triton_available() else "torch"
    if not triton_available():
        raise ValueError("backend='triton' needs the triton package: pip install triton")
    if not usable:
        raise ValueError(f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), got device {device}")
    return "triton"


def _check_float(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")


def _check_same_device(**tensors: torch.Tensor) -> torch.device:
    names = list(tensors)
    first = tensors[names[0]].device
    for name in names[1:]:
        if tensors[name].device != first:
            raise ValueError(f"{name} is on {tensors[name].device} but {names[0]} is on {first}")
    return first


# Signatures that passed the checks below -> the function that runs them (the Triton op or the
# torch reference; None: resolve the backend on every call, since for CPU tensors it follows
# TRITON_INTERPRET). A repeated signature (every training step) skips the shape, dtype, device
# and backend checks; scale, not in the key, is checked on every call. At most _CHECKED_SIZE
# signatures: a full cache is emptied. Not consulted while torch.compile traces.
_checked: dict = {}
_CHECKED_SIZE = 512


def _implementation(name: str, backend: str):
    """The function running op `name` ("mixblock_attention" or "mask_mix") on `backend`."""
    if backend == "torch":
        return getattr(reference, name)
    if name == "mask_mix":
        from automix_fast.kernels.mask_mix import mask_mix as triton_op
    else:
        from automix_fast.kernels.mixblock_attention import mixblock_attention as triton_op
    return triton_op


def _remember(key, name: str, backend: str, device: torch.device):
    """Cache the checked signature `key` (its last two items: the backend asked for, whether
    launches are recorded), which resolved to `backend`; returns the function that runs it."""
    if len(_checked) >= _CHECKED_SIZE:
        _checked.clear()
    fn = _implementation(name, backend)
    # Recording, backend="torch" and non-CPU tensors resolve alike whatever TRITON_INTERPRET says.
    _checked[key] = fn if key[-1] or key[-2] == "torch" or device.type != "cpu" else None
    return fn


def mixblock_attention(q, k, v, scale=None, *, backend: str = "auto") -> torch.Tensor:
    """softmax(q @ k^T * scale, -1) @ v with a one-channel v; (N, L) float32, differentiable in q, k, v."""
    key = None
    if not torch.compiler.is_compiling() and isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) \
            and isinstance(v, torch.Tensor) and type(backend) is str:
        key = ("mixblock_attention", q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype,
               q.device, k.device, v.device, backend, launches.active() is not None)
        fn = _checked.get(key, False)
        if fn is not False:
            scale = _check_scale(scale, q)
            if fn is None:
                fn = _implementation("mixblock_attention", resolve_backend(backend, q.device))
            return fn(q, k, v, float(scale))
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_float(name, t)
    if q.dim() != 3:
        raise ValueError(f"q must be (N, L, D), got shape {tuple(q.shape)}")
    if k.dim() != 3 or k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2]:
        raise ValueError(f"k must be (N, Lk, D) = ({q.shape[0]}, Lk, {q.shape[2]}) to match q, got shape {tuple(k.shape)}")
    if v.dim() != 2 or tuple(v.shape) != tuple(k.shape[:2]):
        raise ValueError(f"v must be (N, Lk) = {tuple(k.shape[:2])} to match k, got shape {tuple(v.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if min(q.shape) == 0 or k.shape[1] == 0:
        raise ValueError(f"q and k must be non-empty, got shapes {tuple(q.shape)} and {tuple(k.shape)}")
    scale = _check_scale(scale, q)
    device = _check_same_device(q=q, k=k, v=v)
    chosen = resolve_backend(backend, device)
    if key is None:
        fn = _implementation("mixblock_attention", chosen)
    else:
        fn = _remember(key, "mixblock_attention", chosen, device)
    return fn(q, k, v, float(scale))


def _check_scale(scale, q: torch.Tensor):
    """scale, or D ** -0.5 when it is None; a scale that is not a positive number is an error."""
    if scale is None:
        return q.shape[-1] ** -0.5
    if not isinstance(scale, (int, float)) or not scale > 0:
        raise ValueError(f"scale must be a positive number, got {scale!r}")
    return scale


def mask_mix(logits, x, perm, *, mode: str = "nearest", backend: str = "auto"):
    """x_mix = (1 - s) x + s x[perm], s = sigmoid(interpolate(logits, x's size, mode)).

    Returns (x_mix in x's dtype and memory format, s_mean (N,) float32); differentiable in logits.
    perm must hold indices in [0, N) (a permutation in practice); its values are not checked,
    since reading them would wait on the device.
    """
    if isinstance(perm, torch.Tensor) and perm.dim() == 1 and perm.stride(0) != 1:
        perm = perm.contiguous()  # the kernels read partner n at perm's address + n
    key = None
    if not torch.compiler.is_compiling() and isinstance(logits, torch.Tensor) and isinstance(x, torch.Tensor) \
            and isinstance(perm, torch.Tensor) and type(mode) is str and type(backend) is str:
        key = ("mask_mix", logits.shape, x.shape, perm.shape, logits.dtype, x.dtype, perm.dtype,
               logits.device, x.device, perm.device, mode, backend, launches.active() is not None)
        fn = _checked.get(key, False)
        if fn is not False:
            if fn is None:
                fn = _implementation("mask_mix", resolve_backend(backend, x.device))
            return fn(logits, x, perm, mode)
    _check_float("logits", logits)
    _check_float("x", x)
    if x.dim() != 4:
        raise ValueError(f"x must be (N, C, H, W), got shape {tuple(x.shape)}")
    n = x.shape[0]
    if logits.dim() != 4 or logits.shape[0] != n or logits.shape[1] != 1:
        raise ValueError(f"logits must be (N, 1, h, w) with N = {n}, got shape {tuple(logits.shape)}")
    if min(x.shape) == 0 or min(logits.shape) == 0:
        raise ValueError(f"x and logits must be non-empty, got shapes {tuple(x.shape)} and {tuple(logits.shape)}")
    if not isinstance(perm, torch.Tensor) or perm.dtype != torch.int64 or tuple(perm.shape) != (n,):
        shape = tuple(perm.shape) if isinstance(perm, torch.Tensor) else type(perm).__name__
        raise ValueError(f"perm must be an int64 tensor of shape ({n},), got {getattr(perm, 'dtype', None)} {shape}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    device = _check_same_device(x=x, logits=logits, perm=perm)
    chosen = resolve_backend(backend, device)
    fn = _implementation("mask_mix", chosen) if key is None else _remember(key, "mask_mix", chosen, device)
    return fn(logits, x, perm, mode)
