"""Is a trained Mix Block's attention doing anything? Statistics of its softmax(q k^T) on one
validation batch, from AutoMix checkpoints (the diagnosis behind `--mix-block-init
cosine-centered`, docs/QUALITY.md "Off the saddle").

    python bench/mix_block_attention.py output/quality/sub10-automix-cosine-s1/last.pt [more.pt ...]
    python bench/mix_block_attention.py RUN/last.pt --data-dir /data/cifar10 --output out.json

JSON (machine, versions, commit, one row per checkpoint) under output/bench/ unless --output.

Per checkpoint, on k's features at the mix stage (as the training's Mix Block sees them), each
image paired with the next one in the batch at lam 0.5:
  - q_cos: mean cosine between the q vectors of two positions of one image, as the kernel gets
    q (normalised for the cosine inits). 1.0 means every position asks the same question: the
    rows of the attention are equal and the mask is one value per image, whatever W_q is.
  - logit_range: mean over queries of max - min of the attention logits (0: uniform softmax).
  - entropy: mean normalised entropy of the attention rows (1: uniform; 0: one-hot).
  - modal_key_share: share of an image's queries whose strongest key is the image's most common
    one (near 1: one key takes every query, another way to a flat mask).
  - mask_pixel_std: the std of the partner weight over an image's pixels, as the training logs.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write_results  # noqa: E402

from automix_fast.mixing.automix import mask_statistics  # noqa: E402
from automix_fast.ops import reference  # noqa: E402


@torch.no_grad()
def attention_stats(mix_block, f: torch.Tensor, lam: float = 0.5) -> dict[str, float]:
    """The statistics above for features f (N, C, h, w), each image paired with the next."""
    perm = torch.roll(torch.arange(f.shape[0], device=f.device), 1)
    q, k, v, scale = mix_block.attention_inputs(mix_block.project(f), lam, perm)
    q, k, v = q.float(), k.float(), v.float()
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = scale * q @ k.transpose(1, 2)  # (N, L, L)
    p = logits.softmax(-1)
    qn = torch.nn.functional.normalize(q, dim=-1)
    argmax = p.argmax(-1)
    modal = torch.stack([(a == a.mode().values).float().mean() for a in argmax])
    # The mask the training would make from these inputs, and its statistic as the training logs it.
    mask_logits = reference.mixblock_attention(q, k, v, scale)
    pixel_std = mask_statistics(mask_logits, torch.sigmoid(mask_logits).mean(1), lam)["mask_pixel_std"]
    return {
        "q_cos": float((qn @ qn.transpose(1, 2)).mean()),
        "logit_range": float((logits.amax(-1) - logits.amin(-1)).mean()),
        "entropy": float(-(p * p.clamp_min(1e-30).log()).sum(-1).mean() / math.log(p.shape[-1])),
        "modal_key_share": float(modal.mean()),
        "mask_pixel_std": float(pixel_std),
    }


def checkpoint_stats(path: str, data_dir: str | None, num: int) -> dict:
    from automix_fast.commands.common import eval_data, load_trained

    overrides = {"data_dir": data_dir, "dataset": "auto"} if data_dir else {}
    trained = load_trained(path, overrides)
    mixer = trained.mixer
    if mixer.mix_block is None:
        raise SystemExit(f"error: {path} was trained with --mix {trained.cfg.mixing.mix}, which has no Mix Block")
    loader, _, _ = eval_data(trained)
    x = next(iter(loader))[0][:num]
    f = mixer.momentum_encoder.forward_features(x, stages=mixer.mix_stage)
    stats = attention_stats(mixer.mix_block, f)
    return {"checkpoint": path, "mix_block_init": mixer.mix_block.init, "images": int(x.shape[0]),
            "feature_map": list(f.shape[1:]), **stats,
            **{k: float(v) for k, v in mixer.mix_block.weight_norms().items()}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--data-dir", default=None, help="evaluation data, if not the checkpoint's own")
    p.add_argument("--num", type=int, default=64, help="validation images to pair")
    p.add_argument("--output", default=None, help="JSON path (default output/bench/mix-block-attention-...)")
    args = p.parse_args(argv)
    with torch.no_grad():
        rows = [checkpoint_stats(c, args.data_dir, args.num) for c in args.checkpoints]
    keys = ("mix_block_init", "q_cos", "logit_range", "entropy", "modal_key_share", "mask_pixel_std")
    print("checkpoint | " + " | ".join(keys))
    for r in rows:
        print(f"{r['checkpoint']} | " + " | ".join(str(r[k]) if isinstance(r[k], str) else f"{r[k]:.4g}" for k in keys))
    print(write_results("mix-block-attention", environment(torch.device("cpu")), {"rows": rows}, args.output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
