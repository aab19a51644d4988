"""mixing/mixblock.py: the Mix Block's definition, its starts (--mix-block-init) and the cosine
attention, on the torch reference and the Triton kernels."""
from __future__ import annotations

import math

import pytest
import torch

from automix_fast.config import build_config
from automix_fast.errors import ConfigError
from automix_fast.mixing.mixblock import COSINE_TEMPERATURE, MixBlock
from mixkit import features
from tolerances import assert_close_lowp

INITS = ("official", "scaled", "cosine", "cosine-centered")
LOWP = {"bf16": torch.bfloat16, "fp16": torch.float16}


def logit_pixel_spread(block, f, perm):
    """Std over pixels of the attention output with W_v fixed: how non-uniform the attention is."""
    with torch.no_grad():
        block.v_proj.weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
        return block(f, 0.5, perm).flatten(1).std(dim=1).mean().item()


def test_mix_block_inits_move_the_attention_off_uniform():
    f, perm = features()
    spreads = {}
    for init in INITS:
        torch.manual_seed(0)
        spreads[init] = logit_pixel_spread(MixBlock(32, backend="torch", init=init), f, perm)
    # Official: logits ~1e-2, a uniform softmax, every pixel the mean of v. The others are not.
    assert all(spreads["official"] < 0.05 * spreads[i] for i in ("scaled", "cosine", "cosine-centered"))
    torch.manual_seed(0)
    official = MixBlock(32, backend="torch")
    assert abs(official.q_proj.weight.std().item() - 0.01) < 0.002 and not hasattr(official, "log_temperature")
    torch.manual_seed(0)
    scaled = MixBlock(32, backend="torch", init="scaled")
    assert abs(scaled.q_proj.weight.std().item() - 32**-0.5) < 0.02
    assert abs(scaled.v_proj.weight.std().item() - 0.01) < 0.002  # masks still start near 0.5


def test_cosine_attention_is_tau_times_cosine_and_trains_tau():
    f, perm = features()
    torch.manual_seed(0)
    block = MixBlock(32, backend="torch", init="cosine")
    assert block.weight_norms()["mix_block_temperature"].item() == pytest.approx(COSINE_TEMPERATURE)
    q = block.q_proj(f).flatten(2).transpose(1, 2)
    v = block.v_proj(f).flatten(2).transpose(1, 2)[..., 0]
    qn = torch.nn.functional.normalize(q, dim=-1)
    expected = torch.softmax(COSINE_TEMPERATURE * qn @ qn[perm].transpose(1, 2), -1) @ v[perm].unsqueeze(-1)
    got = block(f, 0.5, perm)
    torch.testing.assert_close(got.flatten(1), expected.squeeze(-1), rtol=1e-4, atol=1e-5)
    got.square().sum().backward()
    assert block.log_temperature.grad is not None and block.log_temperature.grad.abs() > 0
    # Scaling W_q changes nothing: the logits do not depend on its size.
    with torch.no_grad():
        block.q_proj.weight.mul_(100)
    torch.testing.assert_close(block(f, 0.5, perm), got.detach(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("init", ["scaled", "cosine", "cosine-centered"])
def test_new_inits_match_on_the_triton_kernels(init):
    """The kernels (interpreted on CPU) against the torch reference, values and gradients."""
    f, perm = torch.relu(torch.randn(3, 32, 4, 4, generator=torch.Generator().manual_seed(2))), torch.tensor([1, 2, 0])
    out = {}
    for backend in ("torch", "triton"):
        torch.manual_seed(0)
        block = MixBlock(32, backend=backend, init=init)
        y = block(f, 0.3, perm)
        y.square().sum().backward()
        out[backend] = [y.detach()] + [p.grad for p in block.parameters()]
    for a, b in zip(out["torch"], out["triton"]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


def test_cosine_centered_escapes_the_bias_trap_of_cosine():
    """The trap seen on seed 1 of the study: once q_proj's bias outweighs W_q f, plain cosine's
    normalised q is the bias direction at every position and the attention is uniform again.
    Centred over the positions, q and k do not see the bias at all; centring is exactly
    "cosine of the centred projections"."""
    f, perm = features()
    spreads, outputs = {}, {}
    for init in ("cosine", "cosine-centered"):
        torch.manual_seed(0)
        block = MixBlock(32, backend="torch", init=init)
        outputs[init, "clean"] = block(f, 0.5, perm).detach()
        with torch.no_grad():
            block.q_proj.bias.copy_(100 * torch.linspace(-1, 1, block.dim))  # the bias dominates q
        outputs[init, "biased"] = block(f, 0.5, perm).detach()
        spreads[init] = logit_pixel_spread(block, f, perm)
    assert spreads["cosine"] < 1e-3 * spreads["cosine-centered"]  # plain cosine: flat again
    torch.testing.assert_close(outputs["cosine-centered", "biased"], outputs["cosine-centered", "clean"],
                               rtol=1e-4, atol=1e-5)
    torch.manual_seed(0)
    block = MixBlock(32, backend="torch", init="cosine-centered")
    q = block.q_proj(f).flatten(2).transpose(1, 2)
    v = block.v_proj(f).flatten(2).transpose(1, 2)[..., 0]
    qc = torch.nn.functional.normalize(q - q.mean(1, keepdim=True), dim=-1)
    expected = torch.softmax(COSINE_TEMPERATURE * qc @ qc[perm].transpose(1, 2), -1) @ v[perm].unsqueeze(-1)
    torch.testing.assert_close(block(f, 0.5, perm).flatten(1), expected.squeeze(-1), rtol=1e-4, atol=1e-5)


def test_bad_mix_block_init_is_refused():
    with pytest.raises(ConfigError, match="--mix-block-init"):
        build_config(overrides={"mix_block_init": "huge"})
    with pytest.raises(ValueError, match="init"):
        MixBlock(8, init="huge")


@pytest.mark.parametrize("lam_concat", [False, True])
def test_mixblock_matches_concat_formulation(lam_concat):
    """W f computed once + lam as bias == the 1x1 convs over concat(f, lam) (the Mix Block's definition)."""
    torch.manual_seed(0)
    mb = MixBlock(12, lam_concat=lam_concat, backend="torch")
    for p in mb.parameters():
        torch.nn.init.normal_(p, 0, 0.3)  # larger than the init so the attention is not flat
    f = torch.randn(3, 12, 4, 5)
    perm = torch.tensor([2, 0, 1])
    lam = 0.3
    a, b = f, f[perm]
    if lam_concat:
        a = torch.cat([a, torch.full_like(f[:, :1], lam)], 1)
        b = torch.cat([b, torch.full_like(f[:, :1], 1 - lam)], 1)
    q = mb.q_proj(a).flatten(2).transpose(1, 2)
    k = mb.q_proj(b).flatten(2).transpose(1, 2)
    v = mb.v_proj(b).flatten(2).transpose(1, 2)
    p = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(mb.dim), -1)
    expected = (p @ v).transpose(1, 2).reshape(3, 1, 4, 5)
    got = mb(f, lam, perm)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_mixblock_init_gives_half_masks():
    mb = MixBlock(64, backend="torch")
    f = torch.randn(4, 64, 8, 8)
    s = torch.sigmoid(mb(f, 0.5, torch.randperm(4)))
    assert (s - 0.5).abs().max() < 0.05


def check_under_autocast(init: str, dtype: torch.dtype, device: torch.device) -> None:
    """The Mix Block (`init`, with and without lam_concat) on the Triton kernels under `device`'s
    autocast in `dtype` against its float32 result, with the flash-attention yardstick: the same
    block computed by PyTorch in `dtype` (module and features cast, torch reference). The backward
    runs and gives every parameter a finite gradient."""
    f, perm = features()
    f, perm = f.to(device), perm.to(device)
    for lam_concat in (False, True):
        torch.manual_seed(0)
        block = MixBlock(32, backend="triton", init=init, lam_concat=lam_concat).to(device)
        with torch.no_grad():
            ref32 = block(f, 0.3, perm)
        lowp = MixBlock(32, backend="torch", init=init, lam_concat=lam_concat).to(device)
        lowp.load_state_dict(block.state_dict())
        with torch.no_grad():
            ref_lowp = lowp.to(dtype)(f.to(dtype), 0.3, perm)
        with torch.autocast(device.type, dtype=dtype):
            got = block(f, 0.3, perm)
        assert_close_lowp(got, ref32, ref_lowp, dtype, f"logits [{init} lam_concat={lam_concat} {dtype}]")
        got.square().sum().backward()
        for name, p in block.named_parameters():
            assert p.grad is not None and bool(p.grad.isfinite().all()), f"{name}: no finite gradient"


def normalize_as_under_cuda_autocast(input, p=2.0, dim=1, eps=1e-12, out=None):
    """F.normalize as CUDA autocast runs it: aten::norm is on its float32 list (the norm comes back
    float32), so a bf16/fp16 input is divided by a float32 norm and the result is float32. CPU
    autocast has no such rule."""
    return input / input.norm(p, dim, keepdim=True, dtype=torch.float32).clamp_min(eps).expand_as(input)


@pytest.mark.parametrize("dtype", list(LOWP), ids=list(LOWP))
@pytest.mark.parametrize("init", INITS)
def test_every_init_runs_under_cuda_autocasts_float32_norm(init, dtype, device, monkeypatch):
    """With F.normalize promoted to float32 as CUDA autocast does (also under CPU autocast): q, k
    and v still reach the kernel in one dtype, and the logits match the float32 block."""
    monkeypatch.setattr(torch.nn.functional, "normalize", normalize_as_under_cuda_autocast)
    check_under_autocast(init, LOWP[dtype], device)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", list(LOWP), ids=list(LOWP))
@pytest.mark.parametrize("init", INITS)
def test_every_init_runs_under_cuda_autocast_gpu(init, dtype):
    check_under_autocast(init, LOWP[dtype], torch.device("cuda"))
