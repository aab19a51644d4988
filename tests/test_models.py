"""The model zoo: registry errors, shapes per stage, parameter counts against torchvision /
the WRN paper, channels_last end to end, the heads, init and gradient flow.

Kept cheap for CPU CI: CIFAR stems run on 2x3x16x16, ImageNet stems on 2x3x64x64 (stride 4 in
the stem: the same stage sizes), with one check each at the real sizes (32 px -> 8x8 and
224 px -> 14x14 at the mix stage); parameter counts are taken on the meta device, and each
model is built once per session.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from automix_fast.errors import ConfigError
from automix_fast.models import Classifier, create_model, list_models, model_summary
from automix_fast.models.resnet import BasicBlock, Bottleneck
from automix_fast.models.wrn import PreActBlock

NUM_CLASSES = 7  # odd, so a head mixed up with a feature dimension shows
MODELS = list_models()
EXPECTED = {
    f"{base}{suffix}"
    for base in ("resnet18", "resnet34", "resnet50", "resnet101", "resnext50_32x4d", "wrn28_8")
    for suffix in ("", "_cifar")
} | {"tinynet", "resnet20_cifar", "resnet56_cifar"}

STAGE_CHANNELS = {
    "resnet18": (64, 128, 256, 512),
    "resnet34": (64, 128, 256, 512),
    "resnet50": (256, 512, 1024, 2048),
    "resnet101": (256, 512, 1024, 2048),
    "resnext50_32x4d": (256, 512, 1024, 2048),
    "wrn28_8": (128, 256, 512),
    "tinynet": (32, 64, 64, 128),
    "resnet20": (16, 32, 64),
    "resnet56": (16, 32, 64),
}

_cache: dict[str, Classifier] = {}


def built(name: str) -> Classifier:
    """One model per name per session (building ResNet-101 is the slow part); in eval mode.
    Tests that change the model take a deepcopy."""
    if name not in _cache:
        torch.manual_seed(0)
        _cache[name] = create_model(name, NUM_CLASSES, mix_head=True).eval()
    return _cache[name]


def is_cifar(model: Classifier) -> bool:
    return model.default_img_size == 32


def sample(model: Classifier, n: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    side = 16 if is_cifar(model) else 64  # stage 1..4 at 16, 8, 4, 2 either way
    return torch.randn(n, 3, side, side, generator=g)


def meta_params(name: str, num_classes: int, **kwargs) -> int:
    with torch.device("meta"):  # counts without allocating or initializing anything
        return sum(p.numel() for p in create_model(name, num_classes, **kwargs).parameters())


# ---------------------------------------------------------------- registry


def test_registry_has_the_zoo():
    assert set(MODELS) == EXPECTED
    assert MODELS == sorted(MODELS)


def test_unknown_model_names_it_and_the_choices():
    with pytest.raises(ConfigError) as err:
        create_model("foo", 10)
    msg = str(err.value)
    assert "'foo'" in msg and "resnet18" in msg and "tinynet" in msg and "\n" not in msg
    with pytest.raises(ConfigError, match="'foo'"):
        model_summary("foo")


@pytest.mark.parametrize("bad", [0, -3, True, 2.5, "10"])
def test_bad_num_classes(bad):
    with pytest.raises(ConfigError, match="num_classes"):
        create_model("tinynet", bad)


def test_unknown_option_is_a_config_error():
    with pytest.raises(ConfigError, match="drop_rat"):
        create_model("tinynet", 10, drop_rat=0.1)
    # Options a builder does take pass through.
    m = create_model("tinynet", 10, zero_init_residual=False)
    assert m.arch == "tinynet"


def test_model_summary_is_one_line():
    line = model_summary("resnet50")
    assert "\n" not in line and line.startswith("resnet50:")
    assert "256-512-1024-2048" in line and "25.56M" in line and "224" in line and "imagenet" in line
    cifar = model_summary("wrn28_8_cifar")
    assert "128-256-512" in cifar and "23.36M" in cifar and "img 32" in cifar and "cifar" in cifar


# ---------------------------------------------------------------- parameter counts


@pytest.mark.parametrize(
    "name,classes,count",
    [
        ("resnet18", 1000, 11_689_512),  # torchvision
        ("resnet34", 1000, 21_797_672),
        ("resnet50", 1000, 25_557_032),
        ("resnet101", 1000, 44_549_160),
        ("resnext50_32x4d", 1000, 25_028_904),
        # OpenMixup's WRN-28-8 backbone (conv biases included) is 23,357,792, plus a 10-class head.
        ("wrn28_8_cifar", 10, 23_357_792 + 512 * 10 + 10),
        ("wrn28_8", 10, 23_357_792 + 5130 + 16 * 3 * (7 * 7 - 3 * 3)),  # the same with a 7x7 stem conv, no stem BN
    ],
)
def test_parameter_counts(name, classes, count):
    assert meta_params(name, classes) == count


@pytest.mark.parametrize("name, stem", [("wrn28_8", [nn.Conv2d, nn.MaxPool2d]), ("wrn28_8_cifar", [nn.Conv2d]),
                                        ("resnet18", [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d]),
                                        ("resnet18_cifar", [nn.Conv2d, nn.BatchNorm2d, nn.ReLU])])
def test_a_pre_activation_net_normalizes_its_stem_output_once(name, stem):
    """The pre-activation WRN's first block starts with BN + ReLU, so its stem (either kind) has
    none; the post-activation ResNets normalize in the stem."""
    model = built(name)
    assert [type(m) for m in model.stem] == stem
    assert isinstance(model.stages[0][0], PreActBlock) == name.startswith("wrn")  # starts with bn1 + ReLU


def test_mix_head_adds_one_linear():
    plain = meta_params("resnet18_cifar", 100)
    assert meta_params("resnet18_cifar", 100, mix_head=True) == plain + 512 * 100 + 100


# ---------------------------------------------------------------- shapes


@pytest.mark.parametrize("name", MODELS)
def test_logits_and_stage_shapes(name):
    model = built(name)
    x = sample(model)
    n = x.shape[0]
    assert model.stage_channels == STAGE_CHANNELS[name.removesuffix("_cifar")]
    assert model.num_stages == len(model.stage_channels)
    assert model.num_features == model.stage_channels[-1]
    # The official Mix Block reads stage 3 of a ResNet, stage 2 of WRN-28-8 (mask_layer=1, 256 ch);
    # the three-stage CIFAR ResNets follow WRN (models/cifar_resnet.py).
    three_stages = name.startswith(("wrn", "resnet20", "resnet56"))
    assert model.mix_stage == (2 if three_stages else 3)
    assert model.num_stages == (3 if three_stages else 4)
    assert model.default_img_size == (32 if name == "tinynet" or name.endswith("_cifar") else 224)
    # Input pixels per feature pixel after each stage.
    if name == "tinynet":
        reduction = (2, 4, 4, 8)  # max-pools before stages 1, 2 and 4, see models/tiny.py
    else:
        stem_stride = 1 if is_cifar(model) else 4
        reduction = tuple(stem_stride * 2**k for k in range(model.num_stages))
    with torch.no_grad():
        logits = model(x)
        assert logits.shape == (n, NUM_CLASSES)
        assert model(x, head="mix").shape == (n, NUM_CLASSES)
        for k in range(1, model.num_stages + 1):
            feat = model.forward_features(x, stages=k)
            side = x.shape[-1] // reduction[k - 1]
            assert feat.shape == (n, model.stage_channels[k - 1], side, side), f"stage {k}"
        # stages=None is all of them, and forward = head(features).
        torch.testing.assert_close(model.forward_head(model.forward_features(x)), logits)


@pytest.mark.parametrize(
    "name,side,mix_shape",
    [
        ("tinynet", 32, (64, 8, 8)),
        ("resnet18_cifar", 32, (256, 8, 8)),
        ("wrn28_8_cifar", 32, (256, 16, 16)),
        ("resnet18", 224, (256, 14, 14)),
    ],
)
def test_mix_stage_at_the_default_size(name, side, mix_shape):
    model = built(name)
    assert model.default_img_size == side
    with torch.no_grad():
        feat = model.forward_features(torch.randn(1, 3, side, side), stages=model.mix_stage)
    assert feat.shape == (1, *mix_shape)


@pytest.mark.parametrize("bad", [0, 5, -1, True, 2.0, "3"])
def test_stages_out_of_range(bad):
    with pytest.raises(ValueError, match="stages"):
        built("tinynet").forward_features(torch.randn(1, 3, 32, 32), stages=bad)


# ---------------------------------------------------------------- heads


def test_mix_head_only_when_asked_for():
    x = torch.randn(2, 3, 32, 32)
    plain = create_model("tinynet", 10)
    assert plain.head_mix is None and not plain.has_mix_head
    assert not any(k.startswith("head_mix") for k in plain.state_dict())
    with pytest.raises(ValueError, match="mix_head=True"):
        plain(x, head="mix")
    with pytest.raises(ValueError, match="mix_head=True"):
        plain.forward_head(torch.randn(2, plain.num_features, 4, 4), head="mix")
    with pytest.raises(ValueError, match="head must be"):
        plain(x, head="two")
    mixed = create_model("tinynet", 10, mix_head=True)
    assert mixed.has_mix_head
    feat = torch.randn(2, mixed.num_features, 4, 4)
    assert not torch.equal(mixed.forward_head(feat, "one"), mixed.forward_head(feat, "mix"))


# ---------------------------------------------------------------- channels_last


@pytest.mark.parametrize("name", MODELS)
def test_channels_last_end_to_end(name):
    """Every 4-D activation of a channels_last model on a channels_last input is itself
    channels_last (so nothing copied the layout), and the outputs match the NCHW run."""
    model = built(name)
    x = sample(model)
    with torch.no_grad():
        ref_feat = model.forward_features(x)
        ref_logits = model.forward_head(ref_feat)

    cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    wrong: list[str] = []

    names = {m: n or "model" for n, m in cl.named_modules()}

    def check(mod, _inp, out):
        if isinstance(out, torch.Tensor) and out.dim() == 4 and not out.is_contiguous(memory_format=torch.channels_last):
            wrong.append(names[mod])

    hooks = [m.register_forward_hook(check) for m in cl.modules()]
    try:
        with torch.no_grad():
            feat = cl.forward_features(x.contiguous(memory_format=torch.channels_last))
            logits = cl.forward_head(feat)
    finally:
        for h in hooks:
            h.remove()
    assert not wrong, f"not channels_last after: {wrong[:5]}"
    assert feat.is_contiguous(memory_format=torch.channels_last)
    # fp32 rounding of the two layouts' summation orders grows with the activations' size (WRN's
    # un-normalized residual stream reaches tens at init), so the tolerance is relative to it.
    for got, ref in ((feat, ref_feat), (logits, ref_logits)):
        torch.testing.assert_close(got, ref, atol=1e-5 * max(1.0, ref.abs().max().item()), rtol=1e-5)


# ---------------------------------------------------------------- init


def _residual_blocks(model):
    return [m for m in model.modules() if isinstance(m, (BasicBlock, Bottleneck, PreActBlock))]


def _last_of(block) -> torch.Tensor:
    """The tensor zero_init_residual zeroes: the last BN gamma, or for pre-activation blocks
    the last conv (see PreActBlock.zero_init_last for why)."""
    if isinstance(block, BasicBlock):
        return block.bn2.weight
    if isinstance(block, Bottleneck):
        return block.bn3.weight
    return block.conv2.weight


@pytest.mark.parametrize("name", ["resnet18_cifar", "resnet50_cifar", "wrn28_8_cifar"])  # tinynet has no residual blocks
def test_zero_init_residual(name):
    """On by default for the ResNets; off for WRN (the official WRN does not zero-init), on when asked."""
    default_on = not name.startswith("wrn")
    torch.manual_seed(0)
    on = _residual_blocks(create_model(name, NUM_CLASSES, zero_init_residual=True))
    assert on and all(torch.count_nonzero(_last_of(b)) == 0 for b in on)
    torch.manual_seed(0)
    off = _residual_blocks(create_model(name, NUM_CLASSES, zero_init_residual=False))
    assert all(torch.count_nonzero(_last_of(b)) > 0 for b in off)
    assert all((torch.count_nonzero(_last_of(b)) == 0) == default_on for b in _residual_blocks(built(name)))


def test_init_kaiming_fan_out_and_bn():
    torch.manual_seed(0)
    model = create_model("resnet18", 1000, zero_init_residual=False)
    stem = model.stem[0].weight  # 64 x 3 x 7 x 7
    expected = math.sqrt(2.0 / (64 * 7 * 7))
    assert abs(stem.std().item() / expected - 1) < 0.05
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
    # Heads as the official ClsHead: N(0, 0.01), bias 0 (PyTorch's default would be
    # uniform(+-1/sqrt(512)), std 0.026, with a non-zero bias).
    model = create_model("resnet18", 1000, mix_head=True)
    for head in (model.head_one, model.head_mix):
        assert abs(head.weight.std().item() / 0.01 - 1) < 0.02 and abs(head.weight.mean().item()) < 1e-4
        assert torch.all(head.bias == 0)


# ---------------------------------------------------------------- gradients


@pytest.mark.parametrize("zero_init", [False, True])
@pytest.mark.parametrize("name", ["tinynet", "resnet18", "resnext50_32x4d", "wrn28_8"])
def test_gradients_reach_every_parameter(name, zero_init):
    torch.manual_seed(0)
    model = create_model(name, NUM_CLASSES, mix_head=True, zero_init_residual=zero_init).train()
    x = sample(model)
    y = torch.tensor([1, 4])
    loss = F.cross_entropy(model(x), y) + F.cross_entropy(model(x, head="mix"), y)
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
        # With the residual branches zeroed, the layers before the zero get no gradient on
        # the first step (the zeroed tensor itself does), so only check non-zero without it.
        if not zero_init:
            assert torch.count_nonzero(p.grad) > 0, pname


def test_a_tuple_of_heads_reads_one_head_per_equal_part_of_the_batch():
    """model(x, head=("one", "mix")): one backbone pass over the stacked batches, head_one on the
    first half and head_mix on the second (as two passes when BatchNorm uses running statistics);
    a batch that does not split evenly or a bad head name is a one-line error before any work."""
    torch.manual_seed(0)
    model = create_model("tinynet", num_classes=5, mix_head=True).eval()
    a, b = torch.randn(3, 3, 32, 32), torch.randn(3, 3, 32, 32)
    one, mix = model(torch.cat([a, b]), head=("one", "mix"))
    torch.testing.assert_close(one, model(a, head="one"), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mix, model(b, head="mix"), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"a batch of 5 does not split into 2 equal parts for the heads \('one', 'mix'\)"):
        model(torch.randn(5, 3, 32, 32), head=("one", "mix"))
    with pytest.raises(ValueError, match="head must be one of"):
        model(torch.cat([a, b]), head=("one", "mixed"))
