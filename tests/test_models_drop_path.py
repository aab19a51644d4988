"""models/drop_path.py: --drop-path (stochastic depth): the linear rule per block, whole samples
dropped in training, nothing in eval, and the one-line error for a model without residual blocks."""
from __future__ import annotations

import pytest
import torch

from automix_fast.mixing import build_mixer
from automix_fast.models import create_model
from automix_fast.models.drop_path import DropPath
from faultkit import cli, train_args


def test_drop_path_linear_rule_eval_noop_and_same_state_dict():
    torch.manual_seed(0)
    plain = create_model("resnet18_cifar", num_classes=10)
    dropped = create_model("resnet18_cifar", num_classes=10, drop_path_rate=0.2)
    rates = [m.p for m in dropped.modules() if isinstance(m, DropPath)]
    assert rates == pytest.approx([0.2 * i / 7 for i in range(1, 8)])  # block 0 gets 0: no module
    assert list(plain.state_dict()) == list(dropped.state_dict())
    dropped.load_state_dict(plain.state_dict())
    x = torch.randn(4, 3, 32, 32)
    plain.eval(), dropped.eval()
    torch.testing.assert_close(dropped(x), plain(x))  # no effect in eval mode


def test_drop_path_drops_whole_samples_in_training():
    torch.manual_seed(0)
    dp = DropPath(0.5).train()
    out = dp(torch.ones(400, 2, 3, 3))
    per_sample = out.flatten(1)
    assert set(per_sample.unique().tolist()) == {0.0, 2.0}  # dropped, or kept and scaled by 1/(1-p)
    assert torch.all(per_sample.min(1).values == per_sample.max(1).values)  # the whole sample
    assert abs((per_sample[:, 0] == 0).float().mean().item() - 0.5) < 0.1


def test_drop_path_in_wrn_and_the_momentum_encoder():
    from automix_fast.models.wrn import wide_resnet

    wrn = wide_resnet(16, 1, 10, stem="cifar", drop_path_rate=0.3)  # 6 blocks
    assert [m.p for m in wrn.modules() if isinstance(m, DropPath)] == pytest.approx([0.3 * i / 5 for i in range(1, 6)])
    model = create_model("resnet18_cifar", num_classes=3, mix_head=True, drop_path_rate=0.1)
    mixer = build_mixer("automix", model, kernel_backend="torch")
    assert sum(isinstance(m, DropPath) for m in mixer.momentum_encoder.modules()) == 7


def test_drop_path_on_a_model_without_residual_blocks(data, tmp_path):
    run = cli(train_args(data, tmp_path, "dp", "--mix", "vanilla", "--drop-path", "0.1", epochs=1))
    assert run.returncode == 2
    assert run.stderr.strip().count("\n") == 0 and "residual blocks" in run.stderr
