"""engine/optim.py: optimizer construction and weight-decay groups."""
import pytest
import torch
from torch import nn

from automix_fast.engine.optim import build_optimizer, param_groups_weight_decay
from automix_fast.errors import ConfigError


def test_no_decay_on_bias_and_norm():
    m = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.Linear(8, 4))
    groups = param_groups_weight_decay(m, 1e-4)
    decay, no_decay = groups
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(m[0].weight), id(m[2].weight)}
    assert {id(p) for p in no_decay["params"]} == {id(m[1].weight), id(m[1].bias), id(m[2].bias)}
    m[0].weight.requires_grad_(False)
    groups = param_groups_weight_decay(m, 1e-4, no_decay_1d=False)
    # bn.weight decays now (biases never do); the frozen conv weight is left out
    assert [len(g["params"]) for g in groups] == [2, 2]


def test_build_optimizer_groups_keep_their_decay():
    m = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    opt = build_optimizer(param_groups_weight_decay(m, 5e-4), "sgd", lr=0.1, weight_decay=5e-4)
    assert isinstance(opt, torch.optim.SGD)
    assert [g["weight_decay"] for g in opt.param_groups] == [5e-4, 0.0]
    assert opt.param_groups[0]["momentum"] == 0.9 and not opt.param_groups[0]["nesterov"]
    opt = build_optimizer(m.parameters(), "adamw", lr=1e-3, weight_decay=0.05, device="cpu")
    assert isinstance(opt, torch.optim.AdamW) and opt.param_groups[0]["weight_decay"] == 0.05


def test_optimizer_errors():
    params = list(nn.Linear(2, 2).parameters())
    with pytest.raises(ConfigError, match="unknown opt 'lamb'; choose from: sgd, adamw"):
        build_optimizer(params, "lamb", lr=0.1)
    with pytest.raises(ConfigError, match="lr must be > 0"):
        build_optimizer(params, "sgd", lr=0.0)
    try:
        import apex.optimizers  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="apex.optimizers.FusedSGD"):
            build_optimizer(params, "apex_sgd", lr=0.1)


@pytest.mark.parametrize("nesterov", [False, True])
def test_fused_sgd_skipping_its_first_step_keeps_a_finite_momentum(nesterov):
    """A fused SGD whose first step is skipped (found_inf = 1: an fp16 overflow, a non-finite
    gradient) leaves parameters and momentum at zero change, and its next step is torch's
    first step bit for bit (unfused SGD's, which creates its buffer from that step's gradient);
    then both go on equal. torch alone creates the buffers with empty_like and keeps them."""
    torch.manual_seed(0)
    w = torch.randn(64, 9)
    grads = [torch.randn(64, 9) for _ in range(3)]
    fused_w, plain_w = nn.Parameter(w.clone()), nn.Parameter(w.clone())
    fused = build_optimizer([fused_w], "sgd", lr=0.1, weight_decay=1e-4, nesterov=nesterov, fused=True)
    plain = build_optimizer([plain_w], "sgd", lr=0.1, weight_decay=1e-4, nesterov=nesterov)
    fused_w.grad = torch.full_like(w, float("inf"))
    fused.found_inf = torch.ones(())
    fused.step()  # skipped
    assert torch.equal(fused_w.detach(), w) and torch.equal(fused.state[fused_w]["momentum_buffer"], torch.zeros_like(w))
    fused.found_inf = torch.zeros(())
    for g in grads:
        fused_w.grad, plain_w.grad = g.clone(), g.clone()
        fused.step()
        plain.step()
        assert torch.equal(fused_w.detach(), plain_w.detach())
        assert torch.equal(fused.state[fused_w]["momentum_buffer"], plain.state[plain_w]["momentum_buffer"])


def test_a_loaded_fused_sgd_state_gets_zero_momentum_where_it_has_none():
    from automix_fast.engine.optim import start_momentum_at_zero

    a, b = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(2))
    opt = build_optimizer([a, b], "sgd", lr=0.1, fused=True)
    state = opt.state_dict()
    del state["state"][1]  # a checkpoint whose b never had a step
    opt.load_state_dict(state)
    assert "momentum_buffer" not in opt.state[b]
    start_momentum_at_zero(opt)
    assert torch.equal(opt.state[b]["momentum_buffer"], torch.zeros(2))
    plain = build_optimizer([nn.Parameter(torch.ones(2))], "sgd", lr=0.1)
    assert not plain.state  # torch's own first step creates the unfused buffers: nothing to do
