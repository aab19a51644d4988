"""Optional interop: an export of our ResNet family loads into torchvision's own model and gives
the same logits. torchvision is not a dependency (it imports here only beside a CUDA build of
torch 2.14.1), so this test skips without it; run it with
`pip install torch==2.14.1 torchvision==0.29.1` in a separate venv."""
from __future__ import annotations

import pytest
import torch

from automix_fast.export import export_state, torchvision_name
from automix_fast.models import create_model

torchvision = pytest.importorskip("torchvision")


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "resnext50_32x4d"])
def test_export_loads_into_torchvision_with_the_same_logits(arch):
    torch.manual_seed(0)
    ours = create_model(arch, num_classes=7)
    with torch.no_grad():  # random BN statistics, so a swapped running_mean/var would show
        for name, t in ours.state_dict().items():
            if t.is_floating_point() and "running_var" in name:
                t.copy_(torch.rand_like(t) + 0.5)
            elif t.is_floating_point() and "running_mean" in name:
                t.copy_(0.1 * torch.randn_like(t))
    state = export_state({"model." + k: v for k, v in ours.state_dict().items()}, arch)
    theirs = getattr(torchvision.models, torchvision_name(arch))(num_classes=7)
    theirs.load_state_dict(state, strict=True)  # every key present, none left over, shapes equal
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(theirs.eval()(x), ours.eval()(x), rtol=1e-4, atol=1e-4)
