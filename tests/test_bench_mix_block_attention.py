"""bench/mix_block_attention.py: the attention diagnostic sees the bias trap of plain cosine."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from automix_fast.mixing.mixblock import MixBlock
from mixkit import features

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from mix_block_attention import attention_stats  # noqa: E402


def test_attention_diagnostic_sees_the_trap():
    """bench/mix_block_attention.py's numbers: a trapped cosine block has q_cos 1, logit range 0
    and entropy 1 (uniform); its centred twin does not; the official start is nearly uniform."""
    f, _ = features()
    stats = {}
    for init in ("official", "cosine", "cosine-centered"):
        torch.manual_seed(0)
        block = MixBlock(32, backend="torch", init=init)
        if init.startswith("cosine"):
            with torch.no_grad():
                block.q_proj.bias.copy_(100 * torch.linspace(-1, 1, block.dim))
        stats[init] = attention_stats(block, f)
    assert stats["cosine"]["q_cos"] > 0.9999 and stats["cosine"]["logit_range"] < 1e-3
    assert stats["cosine"]["entropy"] > 0.9999
    assert stats["cosine-centered"]["q_cos"] < 0.5 and stats["cosine-centered"]["logit_range"] > 1
    assert stats["cosine-centered"]["entropy"] < stats["cosine"]["entropy"]
    assert stats["official"]["logit_range"] < 0.1 and stats["official"]["entropy"] > 0.999
    for s in stats.values():
        assert 0 <= s["modal_key_share"] <= 1 and s["mask_pixel_std"] >= 0
