"""engine/grad_clip.py: --clip-grad/--clip-mode (norm, value, agc), on the device, after unscaling."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from automix_fast.engine.grad_clip import grad_clipper
from automix_fast.engine.train_step import StepGuard, nonfinite_flag, optimizer_step


def _linear_with_grad(scale: float = 100.0):
    torch.manual_seed(0)
    lin = nn.Linear(6, 3)
    (lin(torch.randn(4, 6)).pow(2).sum() * scale).backward()
    return lin, list(lin.parameters())


def test_clip_modes():
    lin, params = _linear_with_grad()
    grad_clipper(0.5, "norm")(params)
    total = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
    assert total == pytest.approx(0.5, rel=1e-4)
    lin, params = _linear_with_grad()
    grad_clipper(0.01, "value")(params)
    assert max(p.grad.abs().max().item() for p in params) == pytest.approx(0.01)
    lin, params = _linear_with_grad()
    grad_clipper(0.01, "agc")(params)
    w, g = lin.weight.detach(), lin.weight.grad
    assert torch.all(g.norm(dim=1) <= 0.01 * w.norm(dim=1) * (1 + 1e-4))
    assert grad_clipper(None) is None


def test_clipping_reads_nothing_on_the_host(monkeypatch):
    """A host read per step would stall a GPU pipeline; every mode stays on the device."""
    def refuse(*_a, **_k):
        raise AssertionError("clipping read a device value on the host")

    for mode in ("norm", "value", "agc"):
        _, params = _linear_with_grad()
        clip = grad_clipper(0.1, mode)
        with monkeypatch.context() as m:
            for name in ("item", "tolist", "__bool__", "__float__"):
                m.setattr(torch.Tensor, name, refuse)
            clip(params)


def test_clip_applies_to_unscaled_gradients_under_grad_scaler():
    lin, params = _linear_with_grad(scale=0.0)
    opt = torch.optim.SGD(params, lr=1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    start = [p.detach().clone() for p in params]
    loss = lin(torch.randn(4, 6)).pow(2).sum() * 100.0
    opt.zero_grad()
    scaler.scale(loss).backward()
    optimizer_step(opt, params, StepGuard(torch.device("cpu")), scaler, nonfinite_flag(loss), grad_clipper(0.5, "norm"))
    moved = torch.linalg.vector_norm(torch.stack([(p.detach() - s).norm() for p, s in zip(params, start)]))
    assert moved == pytest.approx(0.5, rel=1e-4)  # clipped after unscaling: the scale does not leak in


def test_agc_leaves_out_the_classifier_heads_as_timm(data, tmp_path):
    """timm's train.py clips `model_parameters(model, exclude_head=True)` in agc mode: the run's
    clipper leaves the classifier heads (head_one, head_mix) as they are and clips the rest, the
    Mix Block included; norm mode clips them all."""
    from automix_fast.config import build_config
    from automix_fast.engine.runner import Trainer

    def clipped(mode: str) -> dict[str, bool]:
        cfg = build_config(overrides=dict(
            data_dir=str(data), img_size=32, epochs=1, batch_size=4, kernel_backend="torch", loader="torch", workers=0,
            device="cpu", mix="automix", output=str(tmp_path), experiment=mode, clip_grad=1e-3, clip_mode=mode))
        trainer = Trainer(cfg, quiet=True)
        names = {id(p): n for n, p in trainer.mixer.named_parameters()}
        params = [p for g in trainer.optimizer.param_groups for p in g["params"]]
        for p in params:
            p.grad = torch.full_like(p, 100.0)
        trainer._step_context().clip(params)
        return {names[id(p)]: not torch.equal(p.grad, torch.full_like(p, 100.0)) for p in params}

    agc = clipped("agc")
    heads = {n for n in agc if n.startswith(("model.head_one.", "model.head_mix."))}
    assert heads == {f"model.head_{h}.{w}" for h in ("one", "mix") for w in ("weight", "bias")}
    assert not any(agc[n] for n in heads) and all(agc[n] for n in agc if n not in heads)
    assert any(n.startswith("mix_block.") for n in agc)
    assert all(clipped("norm").values())
