"""The quality study's options (docs/QUALITY.md): --train-subset, --mix-block-init, --mix-block-every.
Tiny data and tinynet throughout; the one training run is 1 epoch of 4 batches."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from automix_fast.cli import main
from automix_fast.config import build_config
from automix_fast.data import DataSpec, DatasetInfo, build_loaders
from automix_fast.data.embedded import ensure_embedded_dataset
from automix_fast.data.subset import apply_train_subset, class_balanced_subset
from automix_fast.errors import ConfigError
from automix_fast.mixing import build_mixer
from automix_fast.mixing.mixblock import COSINE_TEMPERATURE, MixBlock
from automix_fast.models import create_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from mix_block_attention import attention_stats  # noqa: E402
from mix_block_attention import main as attention_cli  # noqa: E402

# ----------------------------------------------------------------------------- --train-subset


def test_subset_is_class_balanced_and_seeded():
    labels = np.repeat(np.arange(4), [100, 100, 100, 100])
    rng = np.random.default_rng(5)
    labels = labels[rng.permutation(len(labels))]  # classes interleaved, as in a shuffled file list
    idx = class_balanced_subset(labels, 0.1, seed=3)
    assert np.bincount(labels[idx], minlength=4).tolist() == [10, 10, 10, 10]
    assert np.all(np.diff(idx) > 0)  # sorted, no repeats
    np.testing.assert_array_equal(idx, class_balanced_subset(labels, 0.1, seed=3))  # deterministic
    assert not np.array_equal(idx, class_balanced_subset(labels, 0.1, seed=4))  # the seed matters
    assert len(class_balanced_subset(labels, 1.0, seed=3)) == 400
    # Unequal classes keep their own share; a tiny fraction still keeps one image per class.
    uneven = np.repeat(np.arange(3), [50, 20, 3])
    assert np.bincount(uneven[class_balanced_subset(uneven, 0.2, 0)]).tolist() == [10, 4, 1]


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5])
def test_subset_fraction_is_checked(bad):
    with pytest.raises(ConfigError, match="--train-subset"):
        build_config(overrides={"train_subset": bad})
    with pytest.raises(ConfigError, match="fraction"):
        class_balanced_subset([0, 1], bad, 0)


def test_subset_of_arrays_and_file_lists():
    images = np.arange(60, dtype=np.uint8).reshape(60, 1, 1, 1)
    labels = np.arange(60) % 3
    info = DatasetInfo(kind="cifar10", root="mem", classes=["a", "b", "c"], train_arrays=(images, labels),
                       val_arrays=(images, labels))
    apply_train_subset(info, 0.5, seed=1)
    got_images, got_labels = info.train_arrays
    assert np.bincount(got_labels).tolist() == [10, 10, 10]
    np.testing.assert_array_equal(got_images[:, 0, 0, 0] % 3, got_labels)  # images stay with their labels
    assert len(info.val_arrays[1]) == 60  # validation is never subset
    files = DatasetInfo(kind="folder", root="x", classes=["a", "b"], train_samples=[(f"{i}.jpg", i % 2) for i in range(20)],
                        val_samples=[])
    apply_train_subset(files, 0.3, seed=1)
    assert sorted(y for _, y in files.train_samples) == [0, 0, 0, 1, 1, 1]
    assert all(int(p[:-4]) % 2 == y for p, y in files.train_samples)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """10 classes x 10 train / 2 val images of the embedded set."""
    return ensure_embedded_dataset(str(tmp_path_factory.mktemp("cache")), train_per_class=10, val_per_class=2)


@pytest.mark.parametrize("loader", ["torch", "dali"])
def test_loaders_train_on_the_subset_on_every_rank(tiny_data, loader):
    if loader == "dali":
        pytest.importorskip("nvidia.dali")
    seen = []
    for rank in (0, 1):
        spec = DataSpec(dataset="auto", data_dir=tiny_data, batch_size=2, workers=0, loader=loader, rank=rank,
                        world_size=2, seed=rank + 7, train_subset=0.3, train_subset_seed=11)
        train, _, info = build_loaders(spec)
        assert info.num_train == 30 and info.num_val == 20
        assert np.bincount([y for _, y in info.train_samples], minlength=10).tolist() == [3] * 10
        assert len(train) == 30 // 2 // 2  # each rank's share of the subset
        seen.append([p for p, _ in info.train_samples])
    assert seen[0] == seen[1]  # the same subset on every rank, whatever --seed


# ----------------------------------------------------------------------------- --mix-block-init


def features():
    g = torch.Generator().manual_seed(0)
    return torch.relu(torch.randn(4, 32, 8, 8, generator=g)), torch.tensor([1, 2, 3, 0])


def logit_pixel_spread(block, f, perm):
    """Std over pixels of the attention output with W_v fixed: how non-uniform the attention is."""
    with torch.no_grad():
        block.v_proj.weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
        return block(f, 0.5, perm).flatten(1).std(dim=1).mean().item()


def test_mix_block_inits_move_the_attention_off_uniform():
    f, perm = features()
    spreads = {}
    for init in ("official", "scaled", "cosine", "cosine-centered"):
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


def test_bad_mix_block_init_is_refused():
    with pytest.raises(ConfigError, match="--mix-block-init"):
        build_config(overrides={"mix_block_init": "huge"})
    with pytest.raises(ValueError, match="init"):
        MixBlock(8, init="huge")


# ----------------------------------------------------------------------------- --mix-block-every


def make_automix(**kw):
    torch.manual_seed(0)
    model = create_model("tinynet", num_classes=5, mix_head=True)
    mixer = build_mixer("automix", model, seed=1, kernel_backend="torch", **kw)
    mixer.train()
    return mixer


def batch(n=6):
    g = torch.Generator().manual_seed(3)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 5, (n,), generator=g)


def test_every_one_is_todays_step():
    x, y = batch()
    default, every1 = make_automix(), make_automix(mix_block_every=1)
    for step in (0, 1, 2):
        a, la = default.loss(x, y, step, 10)
        b, lb = every1.loss(x, y, step, 10)
        torch.testing.assert_close(a, b)
        assert la.keys() == lb.keys()


def count_k_calls(mixer):
    calls = []
    mixer.momentum_encoder.register_forward_hook(lambda *_: calls.append(1))  # k(x_mb) only; features go through forward_features
    return calls


def test_every_two_skips_the_mix_block_branch_on_odd_steps():
    x, y = batch()
    mixer = make_automix(mix_block_every=2)
    calls = count_k_calls(mixer)
    keys = None
    for step, trains in ((0, True), (1, False), (2, True), (3, False)):
        mixer.zero_grad(set_to_none=True)
        before = len(calls)
        loss, logs = mixer.loss(x, y, step, 10)
        loss.backward()
        mb_grads = [p.grad for p in mixer.mix_block.parameters()]
        if trains:
            assert len(calls) == before + 1 and all(g is not None for g in mb_grads), step
            assert logs["l_mix_k"] > 0
        else:
            assert len(calls) == before, f"k ran on x_mb at skipped step {step}"
            assert all(g is None for g in mb_grads), f"the Mix Block got a gradient at skipped step {step}"
            assert logs["l_mix_k"] == 0 and logs["l_mask"] == 0
            assert all(p.grad is not None for p in mixer.model.parameters())  # q still trains
        keys = keys or logs.keys()
        assert logs.keys() == keys  # the training loop averages every key over every step
    with pytest.raises(ConfigError, match="--mix-block-every"):
        build_config(overrides={"mix_block_every": 0})


def test_a_run_with_the_new_options(tiny_data, tmp_path, capsys):
    argv = ["train", "--data-dir", tiny_data, "--epochs", "1", "-b", "10", "--model", "tinynet", "--loader", "torch",
            "-j", "0", "--log-interval", "1", "--kernel-backend", "torch", "--output", str(tmp_path),
            "--experiment", "q", "--no-visualize", "--train-subset", "0.4", "--mix-block-init", "cosine-centered",
            "--mix-block-every", "2"]
    assert main(argv) == 0, capsys.readouterr().err
    rows = [json.loads(r) for r in (tmp_path / "q" / "metrics.jsonl").read_text().splitlines()]
    train = [r["values"] for r in rows if r["type"] == "train"]
    assert len(train) == 4  # 40 images of the 100, batch 10
    assert [v["l_mix_k"] == 0 for v in train] == [False, True, False, True]
    assert "mix_block_temperature" in train[-1]
    # The attention diagnostic reads the checkpoint back (bench/mix_block_attention.py).
    capsys.readouterr()
    out = tmp_path / "attn.json"
    assert attention_cli([str(tmp_path / "q" / "last.pt"), "--num", "8", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    row = result["rows"][0]
    assert result["meta"]["torch"]
    assert row["mix_block_init"] == "cosine-centered" and row["images"] == 8
    assert row["q_cos"] < 0.5 and 0 < row["entropy"] <= 1 and row["logit_range"] > 0
    assert "cosine-centered" in capsys.readouterr().out


def test_eval_interval_evaluates_every_nth_epoch_and_the_last(tiny_data, tmp_path, capsys):
    argv = ["train", "--data-dir", tiny_data, "--epochs", "3", "-b", "20", "--model", "tinynet", "--loader", "torch",
            "-j", "0", "--kernel-backend", "torch", "--output", str(tmp_path), "--experiment", "e", "--no-visualize",
            "--mix", "vanilla", "--train-subset", "0.4", "--eval-interval", "2"]
    assert main(argv) == 0, capsys.readouterr().err
    rows = [json.loads(r) for r in (tmp_path / "e" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows if r["type"] == "eval"] == [2, 3]
    csv_rows = (tmp_path / "e" / "summary.csv").read_text().splitlines()[1:]
    assert [r.split(",")[3] != "" for r in csv_rows] == [False, True, True]  # eval_top1 per epoch
    summary = json.loads((tmp_path / "e" / "summary.json").read_text())
    assert summary["eval"]["one_top1"] == [r for r in rows if r["type"] == "eval"][-1]["values"]["one_top1"]
