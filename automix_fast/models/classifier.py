"""`Classifier`: the shared shell of every model: stem, stages, and the two linear heads.

A backbone is a stem plus a list of stages; the Mix Block reads the output of stage
`mix_stage` through `forward_features(x, stages=mix_stage)`, which runs only the stages it
needs. Everything here is conv / BN / ReLU / pool / add plus a flatten after pooling, so a
channels_last input stays channels_last end to end with no layout copies.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

HEADS = ("one", "mix")


class Classifier(nn.Module):
    """stem -> stages[0..] -> global average pool -> head_one (and head_mix when mix_head).

    Blocks that want their residual branch to start at zero define `zero_init_last()`;
    it is called when `zero_init_residual` (every block then starts as the identity, which
    trains deep ResNets more stably, Goyal et al. 2017).
    """

    def __init__(
        self,
        stem: nn.Module,
        stages: Sequence[nn.Module],
        stage_channels: Sequence[int],
        num_classes: int,
        *,
        mix_head: bool = False,
        mix_stage: int,
        default_img_size: int,
        stem_type: str,
        zero_init_residual: bool = True,
    ):
        super().__init__()
        if len(stages) != len(stage_channels):
            raise ValueError(f"{len(stages)} stages but {len(stage_channels)} stage_channels")
        if not 1 <= mix_stage <= len(stages):
            raise ValueError(f"mix_stage must be in 1..{len(stages)}, got {mix_stage}")
        self.stem = stem
        self.stages = nn.ModuleList(stages)
        self.stage_channels = tuple(int(c) for c in stage_channels)
        self.num_features = self.stage_channels[-1]
        self.num_stages = len(self.stage_channels)
        self.num_classes = num_classes
        self.mix_stage = mix_stage
        self.default_img_size = default_img_size
        self.stem_type = stem_type
        self.arch = type(self).__name__  # create_model sets the registry name
        self._init_backbone(zero_init_residual)
        # Heads start from N(0, 0.01), bias 0, as the official classification heads (OpenMixup's
        # ClsHead.init_weights); created after the backbone init so that loop never touches them.
        self.head_one = nn.Linear(self.num_features, num_classes)
        self.head_mix = nn.Linear(self.num_features, num_classes) if mix_head else None
        for head in (self.head_one, self.head_mix):
            if head is not None:
                nn.init.normal_(head.weight, 0.0, 0.01)
                nn.init.zeros_(head.bias)

    @property
    def has_mix_head(self) -> bool:
        return self.head_mix is not None

    def _init_backbone(self, zero_init_residual: bool) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if hasattr(m, "zero_init_last"):
                    m.zero_init_last()

    def forward_features(self, x: torch.Tensor, stages: int | None = None) -> torch.Tensor:
        """Stem + stages 1..`stages` (all when None): the (N, C, h, w) feature map."""
        if stages is None:
            stages = self.num_stages
        elif isinstance(stages, bool) or not isinstance(stages, int) or not 1 <= stages <= self.num_stages:
            raise ValueError(f"stages must be an int in 1..{self.num_stages} or None, got {stages!r}")
        x = self.stem(x)
        for stage in self.stages[:stages]:
            x = stage(x)
        return x

    def forward_after(self, feat: torch.Tensor, stage: int) -> torch.Tensor:
        """The stages after `stage` on its output `feat`: with forward_features(x, stage) the
        whole backbone, split where the Mix Block reads."""
        for s in self.stages[stage:]:
            feat = s(feat)
        return feat

    def _head(self, head: str) -> nn.Linear:
        if head == "one":
            return self.head_one
        if head == "mix":
            if self.head_mix is None:
                raise ValueError("head='mix' needs a model built with mix_head=True")
            return self.head_mix
        raise ValueError(f"head must be one of {HEADS}, got {head!r}")

    @staticmethod
    def _pool(feat: torch.Tensor) -> torch.Tensor:
        # (N, C, 1, 1) -> (N, C) is a view in either memory format; never .view the map itself.
        return torch.flatten(F.adaptive_avg_pool2d(feat, 1), 1)

    def forward_head(self, feat: torch.Tensor, head: str = "one") -> torch.Tensor:
        """Global average pool + the linear head `head` ("one" or "mix") -> (N, num_classes)."""
        return self._head(head)(self._pool(feat))

    def forward(self, x: torch.Tensor, head: str | tuple[str, ...] = "one"):
        """The logits of `head` for the batch x; with a tuple of heads, x is that many equal
        batches stacked and the result is a tuple of their logits, one head each (one backbone
        pass over all of them: BatchNorm's batch statistics span every part)."""
        if isinstance(head, tuple):
            linears = [self._head(h) for h in head]  # a bad head name fails before the backbone runs
            if not linears or x.shape[0] % len(linears):
                raise ValueError(f"a batch of {x.shape[0]} does not split into {len(linears)} equal parts for the "
                                 f"heads {head}")
            pooled = self._pool(self.forward_features(x)).split(x.shape[0] // len(linears))
            return tuple(linear(part) for linear, part in zip(linears, pooled))
        linear = self._head(head)  # a bad head name fails before the backbone runs
        return linear(self._pool(self.forward_features(x)))

    def extra_repr(self) -> str:
        return f"arch={self.arch}, stage_channels={self.stage_channels}, mix_stage={self.mix_stage}"
