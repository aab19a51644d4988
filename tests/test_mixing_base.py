"""mixing/base.py: every policy provides the Mixer interface (no caller probes with hasattr)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from automix_fast.mixing import MIXERS, Mixer, build_mixer
from automix_fast.models import create_model


def _mixer(name: str, **kw) -> Mixer:
    torch.manual_seed(0)
    model = create_model("tinynet", num_classes=5, mix_head=name == "automix")
    return build_mixer(name, model, seed=1, kernel_backend="torch", **kw)


@pytest.mark.parametrize("name", MIXERS)
def test_every_policy_provides_the_mixer_interface(name):
    mixer = _mixer(name)
    assert isinstance(mixer, Mixer) and isinstance(mixer.name, str) and isinstance(mixer.label, str)
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 5, (4,), generator=g)
    loss, logs = mixer.loss(x, y, 0, 10)
    loss = loss.detach()
    assert loss.ndim == 0 and torch.isfinite(loss)
    means = {k: float(v) for k, v in logs.items()}
    # summed_terms: logged values that add up to the loss; () for a one-term loss
    assert isinstance(mixer.summed_terms, tuple)
    if mixer.summed_terms:
        assert sum(means[t] for t in mixer.summed_terms) == pytest.approx(float(loss), rel=1e-5)
    note = mixer.progress_text({"loss": loss.item(), **means})
    assert note is None if name != "automix" else isinstance(note, str) and note.startswith("mask ")
    automix = name == "automix"
    assert isinstance(mixer.momentum_encoder, nn.Module) == automix and (mixer.momentum_encoder is None) != automix
    assert isinstance(mixer.mix_block, nn.Module) == automix and (mixer.mix_block is None) != automix
    assert mixer.model_ema is None
    heads = mixer.eval_heads()
    main, (encoder, head) = next(iter(heads.items()))  # the first head is the main one: the online model's
    assert encoder is mixer.model and head == "one" and main == ("q_one" if automix else "one")
    groups = mixer.param_groups(0.1, 1e-4)
    assert sum(len(g["params"]) for g in groups) == sum(1 for p in mixer.parameters() if p.requires_grad)
    mixer.after_step(0, 10)


@pytest.mark.parametrize("name", ["vanilla", "mixup", "cutmix"])
def test_model_ema_is_part_of_the_interface_for_the_baselines(name):
    mixer = _mixer(name, model_ema_decay=0.9)
    assert isinstance(mixer.model_ema, nn.Module) and "ema" in mixer.eval_heads()
    assert mixer.label.endswith(" + model EMA 0.9")


def test_automix_refuses_a_model_ema_of_its_own():
    with pytest.raises(ValueError, match="momentum encoder is its EMA model"):
        _mixer("automix", model_ema_decay=0.9)
