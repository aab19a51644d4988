"""Optimizers: SGD (fused on CUDA), AdamW, and apex's FusedSGD when it is installed.

Note for timm users: `sgd` here is plain momentum SGD (nesterov only with `nesterov=True`),
as in the AutoMix/OpenMixup recipes; timm's `sgd` means nesterov.
"""
from __future__ import annotations

import torch
from torch import nn

from automix_fast.config.sections import OPTIMIZERS
from automix_fast.errors import ConfigError


def param_groups_weight_decay(model: nn.Module, weight_decay: float, no_decay_1d: bool = True,
                              skip: tuple[str, ...] = (), decay_all: bool = False) -> list[dict]:
    """Two groups, timm style: weights with decay, and biases/norm weights (every parameter
    with ndim <= 1 when `no_decay_1d`) plus names in `skip` without. Frozen parameters are left
    out; empty groups are dropped. Decaying BN scales and biases only hurts accuracy, but the
    official AutoMix recipes (mmcv's DefaultOptimizerConstructor) decay every parameter:
    `decay_all` reproduces that (one group, `--decay-norm-and-bias`)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if decay_all:
            decay.append(p)
        elif (no_decay_1d and p.ndim <= 1) or name.endswith(".bias") or name in skip:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def _with_fast_path(cls, params, device, fused: bool = False, **kwargs) -> torch.optim.Optimizer:
    """fused=True on CUDA (one kernel for all parameters), foreach if fused is refused there
    (older torch, or a dtype the fused kernel lacks); torch's default on CPU. `fused`: the fused
    kernel on any device, or a ConfigError (the static-buffer step skips bad steps through it)."""
    if fused:
        try:
            return cls(params, fused=True, **kwargs)
        except (RuntimeError, ValueError, TypeError) as e:
            raise ConfigError(f"--cuda-graph needs torch's fused {cls.__name__}, which this torch refuses here: "
                              f"{str(e).splitlines()[0]}") from None
    if device is not None and torch.device(device).type == "cuda":
        try:
            return cls(params, fused=True, **kwargs)
        except (RuntimeError, ValueError, TypeError):
            return cls(params, foreach=True, **kwargs)
    return cls(params, **kwargs)


def build_optimizer(param_groups, opt: str = "sgd", *, lr: float, momentum: float = 0.9,
                    weight_decay: float = 0.0, nesterov: bool = False, device=None,
                    betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, fused: bool = False,
                    ) -> torch.optim.Optimizer:
    """`--opt sgd|adamw|fused_sgd|apex_sgd`. `param_groups` is an iterable of parameters or of
    group dicts; a group's own `lr`/`weight_decay` override the arguments. `device`: where the
    parameters live (a fused kernel is chosen for CUDA); `fused`: the fused kernel on any device."""
    params = list(param_groups)
    if lr <= 0:
        raise ConfigError(f"lr must be > 0, got {lr}")
    if opt == "sgd":
        if nesterov and momentum <= 0:
            raise ConfigError("nesterov needs momentum > 0")
        sgd = _with_fast_path(torch.optim.SGD, params, device, fused, lr=lr, momentum=momentum,
                              weight_decay=weight_decay, nesterov=nesterov)
        start_momentum_at_zero(sgd)
        return sgd
    if opt == "adamw":
        kwargs = {}
        if fused and device is not None and torch.device(device).type == "cuda":
            kwargs["capturable"] = True  # Adam's step count on the device: a CUDA graph may replay its update
        return _with_fast_path(torch.optim.AdamW, params, device, fused, **kwargs, lr=lr, betas=tuple(betas), eps=eps,
                               weight_decay=weight_decay)
    if opt in ("fused_sgd", "apex_sgd"):
        try:  # NVIDIA apex; the PyPI package named `apex` is unrelated and has no `apex.optimizers`
            from apex.optimizers import FusedSGD
        except ImportError:
            raise ConfigError(f"--opt {opt} needs NVIDIA apex (apex.optimizers.FusedSGD), which is not "
                              "installed; use --opt sgd (fused on CUDA already)") from None
        return FusedSGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
    raise ConfigError(f"unknown opt '{opt}'; choose from: {', '.join(OPTIMIZERS)}")


def host_hyperparameters(state: dict) -> dict:
    """An optimizer state_dict with its groups' tensor hyperparameters (the static step's device
    learning rates) as floats, so the checkpoint loads the same into either kind of step."""
    groups = [{k: v.item() if isinstance(v, torch.Tensor) and v.dim() == 0 and k != "params" else v
               for k, v in g.items()} for g in state["param_groups"]]
    return {**state, "param_groups": groups}


def start_momentum_at_zero(optimizer) -> None:
    """Zero momentum buffers for a fused SGD's parameters that have none (call after building it
    and after load_state_dict). torch's fused SGD creates them uninitialised (empty_like) at its
    first step and keeps them even when found_inf skips that step (an fp16 overflow, a non-finite
    gradient), so the next step would add momentum times garbage. Started at zero, the first
    step's buffer is momentum * 0 + grad = grad (dampening 0), the value torch's first step
    copies (up to the sign of a zero), so nothing else changes."""
    if not isinstance(optimizer, torch.optim.SGD):
        return
    for group in optimizer.param_groups:
        if group.get("fused") and group["momentum"] != 0:
            for p in group["params"]:
                state = optimizer.state[p]
                if state.get("momentum_buffer") is None:
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def check_same_optimizer(saved: str, now: str, path) -> None:
    """A resumed run continues its optimizer's state, so --opt cannot change (another optimizer's
    state does not load into it; fused_sgd and apex_sgd name the same one): one-line ConfigError."""
    apex = ("fused_sgd", "apex_sgd")
    if saved != now and not (saved in apex and now in apex):
        raise ConfigError(f"--opt cannot change on resume ({saved} -> {now}): {path} holds {saved}'s state; to "
                          f"train with {now} from its weights, start a new run with --initial-checkpoint {path}")


def load_state_keeping_settings(optimizer, state: dict) -> None:
    """`optimizer.load_state_dict(state)` for what training accumulated (momentum buffers, Adam's
    moments and step counts), keeping each group's settings as this run built them: weight
    decay, momentum, betas and the rest from its config (a change forced with
    --allow-config-change takes effect), and the kernel choice (fused/foreach/capturable) of this
    run's device and step, not of the run that saved the state. load_state_dict would restore
    the saved ones. The lr stays the saved one until the schedule sets it before the first step."""
    built = [{k: v for k, v in g.items() if k not in ("params", "lr")} for g in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, settings in zip(optimizer.param_groups, built):
        group.update(settings)
