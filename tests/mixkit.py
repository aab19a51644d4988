"""A tiny AutoMix mixer and batch shared by the mixing tests and the fidelity tests."""
from __future__ import annotations

import torch

from automix_fast.mixing import build_mixer
from automix_fast.models import create_model


def make_automix(**kw):
    torch.manual_seed(0)
    model = create_model("tinynet", num_classes=5, mix_head=True)
    return build_mixer("automix", model, seed=1, kernel_backend="torch", **kw)


def batch(n=6, size=32):
    g = torch.Generator().manual_seed(3)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, 5, (n,), generator=g)


def features():
    g = torch.Generator().manual_seed(0)
    return torch.relu(torch.randn(4, 32, 8, 8, generator=g)), torch.tensor([1, 2, 3, 0])
