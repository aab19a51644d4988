"""data/shards.py: one epoch plan for both loaders (torch and DALI), and one "no full batch" error."""
from __future__ import annotations

import pytest
import torch

from automix_fast.data import DataSpec
from automix_fast.data import dali as dali_mod
from automix_fast.data.shards import Shards, check_full_batch, train_indices, val_range
from automix_fast.data.torch_loader import ResidentLoader
from automix_fast.errors import DataError

needs_dali = pytest.mark.skipif(not dali_mod.dali_available(), reason="NVIDIA DALI is not installed")


def _spec(**kw) -> DataSpec:
    base = dict(img_size=8, batch_size=4, eval_batch_size=6, workers=1, seed=3)
    base.update(kw)
    return DataSpec(**base)


def _resident(n: int, spec, train: bool) -> ResidentLoader:
    """A resident loader whose labels are the sample indices, so its batches say what it read."""
    return ResidentLoader(torch.zeros(n, 8, 8, 3, dtype=torch.uint8), torch.arange(n), spec, train, "cifar")


def test_train_plan_is_a_strided_shard_of_one_permutation_in_whole_batches():
    n, bs, ws = 23, 3, 2
    plans = [train_indices(n, bs, 5, 1, r, ws) for r in range(ws)]
    assert all(len(p) == 9 for p in plans)  # 23 // 2 = 11 per rank -> 3 whole batches of 3
    assert not set(plans[0].tolist()) & set(plans[1].tolist())
    assert torch.equal(plans[0], train_indices(n, bs, 5, 1, 0, ws))  # a function of (seed, epoch, rank)
    assert not torch.equal(plans[0], train_indices(n, bs, 5, 2, 0, ws))
    assert [val_range(10, r, 3) for r in range(3)] == [(0, 3), (3, 6), (6, 10)]


@needs_dali
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("rank,world_size", [(0, 1), (0, 2), (1, 2)])
def test_torch_and_dali_loaders_read_the_same_indices(monkeypatch, train, rank, world_size):
    monkeypatch.setattr(dali_mod, "ISOLATE_CPU", False)  # no decoding process: the plan alone is compared
    n = 29
    spec = _spec(rank=rank, world_size=world_size)
    torch_loader = _resident(n, spec, train)
    dali_loader = dali_mod.DaliFolderLoader([(f"img{i}.jpg", i) for i in range(n)], spec, train, "cifar")
    assert isinstance(torch_loader.shards, Shards) and isinstance(dali_loader.shards, Shards)
    assert (len(torch_loader), torch_loader.num_samples) == (len(dali_loader), dali_loader.num_samples)
    for epoch in range(3):
        torch_loader.set_epoch(epoch)
        dali_loader.set_epoch(epoch)
        plan = Shards(n, spec, train)
        plan.set_epoch(epoch)
        read = torch.cat([y for _, y in torch_loader]).tolist()
        assert read == dali_loader.indices().tolist() == plan.indices().tolist()


@needs_dali
def test_too_few_images_is_one_error_from_both_loaders(monkeypatch):
    monkeypatch.setattr(dali_mod, "ISOLATE_CPU", False)
    spec = _spec(batch_size=5, world_size=2)
    message = "train set has 9 images: too few for one batch of 5 on each of 2 rank(s)"
    with pytest.raises(DataError) as direct:
        check_full_batch(9, 5, 2)
    with pytest.raises(DataError) as from_torch:
        _resident(9, spec, True)
    with pytest.raises(DataError) as from_dali:
        dali_mod.DaliFolderLoader([(f"img{i}.jpg", i) for i in range(9)], spec, True, "cifar")
    assert str(direct.value) == str(from_torch.value) == str(from_dali.value) == message
    check_full_batch(10, 5, 2)  # exactly one batch per rank is enough
    _resident(9, spec, False)  # val loaders have no whole-batch requirement
