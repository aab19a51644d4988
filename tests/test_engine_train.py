"""engine/train.py: --grad-accum-steps in the training loop (one process, torchrun, a resume
mid-epoch, a short last step)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from automix_fast.engine.train import EpochCallbacks, EpochPlan, train_one_epoch
from automix_fast.engine.train_step import StepContext, StepGuard
from automix_fast.mixing.baselines import Vanilla
from datakit import BatchList
from faultkit import cli, train_args


class _Schedule:
    def __init__(self):
        self.steps = []

    def apply(self, optimizer, step):  # the loop logs the returned LRs, as LRSchedule.apply's
        self.steps.append(step)
        return [g["lr"] for g in optimizer.param_groups]


def _accumulated_run(micro_batch: int, accum: int, images: int = 40, grad_sync=None, stop_after=None, resume=None,
                     loader=None):
    """Train a BN-free net (Vanilla) for one epoch; returns its weights and the steps scheduled.
    stop_after: stop after that many steps; resume: (model, optimizer, steps done) to continue;
    loader: one of 3 x 8 x 8 images in place of fixed batches of random ones."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(images, 3, 8, 8, generator=g), torch.randint(0, 4, (images,), generator=g)
    torch.manual_seed(0)
    # No BatchNorm: its batch statistics over b and 2b images differ, which would make the
    # comparison inexact for a reason that has nothing to do with accumulation.
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 36, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    skip = 0
    if resume is not None:
        model, opt, skip = resume
    mixer = Vanilla(model)
    if loader is None:
        loader = BatchList([(x[i:i + micro_batch], y[i:i + micro_batch]) for i in range(0, images, micro_batch)])
    schedule = _Schedule()
    calls = []
    stop = None if stop_after is None else (lambda: calls.append(1) or len(calls) >= stop_after)
    ctx = StepContext(mixer, opt, schedule, StepGuard(torch.device("cpu")), total_steps=100, amp_dtype=None,
                      accum_steps=accum, grad_sync=grad_sync)
    result = train_one_epoch(ctx, loader, EpochPlan(epoch=0, start_step=0, skip=skip),
                             EpochCallbacks(log_interval=2, should_stop=stop))
    if stop_after is not None:
        return model, opt, result
    return model.state_dict(), schedule.steps, result


def test_grad_accum_matches_the_larger_batch():
    big, big_steps, big_result = _accumulated_run(8, 1)
    acc, acc_steps, acc_result = _accumulated_run(4, 2)
    assert acc_steps == big_steps == list(range(5))  # steps count optimizer steps
    assert acc_result.images == big_result.images == 40
    for k in big:  # the same sums in another order: float32 rounding only
        torch.testing.assert_close(acc[k], big[k], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(acc_result.means["epoch_loss"], big_result.means["epoch_loss"], rtol=1e-5, atol=1e-6)


def test_grad_accum_under_torchrun_matches_one_process(data, tmp_path):
    """2 ranks x batch 4 x 2 micro-batches with SyncBN see, micro-batch for micro-batch, the images
    (and BN statistics) of 1 process x batch 8 x 2 micro-batches (see test_engine_distributed); the
    gradients are all-reduced once per step, after the second micro-batch."""
    from faultkit import assert_states_equal, torchrun, train_losses, weights

    common = ["--mix", "vanilla", "--sync-bn", "--seed", "3", "--grad-accum-steps", "2"]
    one = cli(train_args(data, tmp_path, "one", *common, batch=8, epochs=1))
    assert one.returncode == 0, one.stderr
    two = torchrun(2, train_args(data, tmp_path, "two", *common, batch=4, epochs=1))
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    l1, l2 = train_losses(tmp_path / "one"), train_losses(tmp_path / "two")
    assert len(l1) == len(l2) == 4  # 7 micro-batches: 3 steps of 2 and 1 of 1
    torch.testing.assert_close(torch.tensor(l2), torch.tensor(l1), rtol=1e-4, atol=1e-5)
    # The summation order differs (per-rank means, then the all-reduce), as in test_engine_distributed.
    assert_states_equal(weights(tmp_path / "two" / "last.pt"), weights(tmp_path / "one" / "last.pt"), atol=2e-4)


def test_grad_accum_resumes_mid_epoch_at_a_step_boundary():
    whole, _, _ = _accumulated_run(4, 3)
    model, opt, first = _accumulated_run(4, 3, stop_after=2)
    assert first.stopped and first.steps == 2
    rest, steps, _ = _accumulated_run(4, 3, resume=(model, opt, first.steps))  # replays 2 x 3 micro-batches
    assert steps == [2, 3]
    for k in whole:
        assert torch.equal(rest[k], whole[k]), k


def test_a_resumed_epoch_decodes_only_the_batches_it_trains_on(tmp_path, monkeypatch):
    """A streaming loader (files decoded per batch, random-resized crops) resumed after 1 of 3
    steps of 2 micro-batches starts at micro-batch 2 (loader.start_at): it decodes the 16 files of
    micro-batches 2..5 and no other, and the run ends on the uninterrupted run's weights, bit for bit."""
    from automix_fast.data import build_loaders, torch_loader
    from datakit import folder_spec, make_folder

    root = make_folder(tmp_path, per_class=12)  # 24 files: 6 micro-batches of 4

    def streaming():
        loader = build_loaders(folder_spec(root, img_size=8, aug="imagenet", batch_size=4, seed=1))[0]
        assert isinstance(loader, torch_loader.StreamingLoader)
        return loader

    decoded = []
    load_rgb = torch_loader.load_rgb
    monkeypatch.setattr(torch_loader, "load_rgb", lambda path: decoded.append(path) or load_rgb(path))
    whole, _, _ = _accumulated_run(4, 2, loader=streaming())
    assert len(decoded) == 24
    model, opt, first = _accumulated_run(4, 2, stop_after=1, loader=streaming())
    assert first.stopped and first.steps == 1
    decoded.clear()
    rest, steps, _ = _accumulated_run(4, 2, resume=(model, opt, first.steps), loader=streaming())
    assert steps == [1, 2]
    assert len(decoded) == 16 and not set(decoded) & set(_first_files(root, 8))
    for k in whole:
        assert torch.equal(rest[k], whole[k]), k


def _first_files(root, count: int) -> list[str]:
    """The files of the first `count` samples of epoch 0 (seed 1), in reading order."""
    from automix_fast.data import build_loaders
    from datakit import folder_spec

    loader = build_loaders(folder_spec(root, img_size=8, aug="imagenet", batch_size=4, seed=1))[0]
    loader.set_epoch(0)
    return [loader.paths[i] for i in loader.shards.indices()[:count].tolist()]


def test_grad_accum_last_step_takes_the_rest():
    syncs = []
    _, steps, result = _accumulated_run(4, 3, grad_sync=syncs.append)  # 10 micro-batches: 3 + 3 + 3 + 1
    assert steps == [0, 1, 2, 3] and result.steps == 4 and result.images == 40
    assert len(syncs) == 4  # one all-reduce per optimizer step, none for the other micro-batches


class _FixedLogits(nn.Module):
    """A 'model' whose logits are its input (features = input): its predictions are chosen by hand."""

    def forward_features(self, x):
        return x

    def forward_head(self, feat, head="one"):
        return feat


def test_evaluate_reports_the_percentages_eval_reports():
    """3 of 7 right at top-1 and 5 of 7 at top-5 (6 classes), over batches of 3, 3 and 1: the
    training evaluation's numbers (summary.csv, metrics.jsonl) are those `automix-fast eval`
    reports for the same predictions, to the last bit (counts divided on the host in float64)."""
    from automix_fast.commands.eval import confusion_by_head, report
    from automix_fast.engine.train import evaluate

    logits = torch.tensor([[6.0, 5, 4, 3, 2, 1]] * 7)  # ranking 0, 1, ..., 5 for every image
    y = torch.tensor([0, 0, 0, 1, 4, 5, 5])  # top-1: 3, top-5: 5
    loader = [(logits[i:i + 3], y[i:i + 3]) for i in range(0, 7, 3)]
    mixer = Vanilla(_FixedLogits())
    out = evaluate(mixer, loader, amp_dtype=None, device=torch.device("cpu"))
    heads = report(*confusion_by_head(mixer, loader, 6, amp_dtype=None, device=torch.device("cpu")), list("abcdef"))
    assert out["count"] == 7
    assert out["one_top1"] == heads["one"]["top1"] == 100.0 * 3 / 7
    assert out["one_top5"] == heads["one"]["top5"] == 100.0 * 5 / 7
    expected_loss = torch.nn.functional.cross_entropy(logits.double(), y, reduction="sum").item() / 7
    assert out["one_loss"] == pytest.approx(expected_loss, rel=1e-6)


@pytest.mark.parametrize("skips", [False, True])
def test_a_resumed_epochs_console_clock_starts_after_the_replay(monkeypatch, skips):
    """Resuming at step 3: a loader without start_at replays the 3 batches done (the data order of
    the interrupted epoch) and the line says how long that took; one with start_at yields from
    batch 3 at once and the line says nothing of a replay. Either way the console's epoch time,
    img/s and data% cover the steps run, as metrics.jsonl's img_per_s_global does. A stand-in
    clock moves 10 s for every batch the loader yields, nothing else."""
    import io
    import time

    from automix_fast.engine.metrics import ProgressLine

    clock = [0.0]
    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])

    class SlowLoader(BatchList):
        first = 0

        def __iter__(self):
            first, self.first = self.first, 0
            for batch in self.batches[first:]:
                clock[0] += 10.0
                yield batch

    class SkippingLoader(SlowLoader):
        def start_at(self, batch):
            self.first = batch

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 3, 8, 8, generator=g), torch.randint(0, 4, (40,), generator=g)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 36, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ctx = StepContext(Vanilla(model), opt, _Schedule(), StepGuard(torch.device("cpu")), total_steps=100, amp_dtype=None)
    loader = (SkippingLoader if skips else SlowLoader)([(x[i:i + 8], y[i:i + 8]) for i in range(0, 40, 8)])
    out = io.StringIO()
    progress = ProgressLine(1, 1, 5, log_interval=100, stream=out, start_step=3)
    result = train_one_epoch(ctx, loader, EpochPlan(epoch=0, start_step=0, skip=3),
                             EpochCallbacks(log_interval=100, progress=progress))
    summary = progress.close()
    # The stand-in clock's 2 batches x 10 s: what the line counts, not how fast anything ran.
    assert result.steps == 2 and result.seconds == 20.0 and result.means["img_per_s_global"] == 16 / 20.0
    assert summary["time_s"] == 20.0 and summary["img_per_s"] == 16 / 20.0 and summary["data_frac"] == 1.0
    resumed = "resumed at step 3 of 5" if skips else "resumed at step 3 of 5, its data replayed in 30.0s"
    assert out.getvalue().startswith(f"epoch 1/1 done: 2 steps ({resumed}) in 20.0s ")
