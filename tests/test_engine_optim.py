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
