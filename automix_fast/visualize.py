"""A PNG grid of what the Mix Block does: image, partner, mask, mixed sample (one column each pair)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from automix_fast.ops import reference


def _to_uint8(x: torch.Tensor, mean, std) -> np.ndarray:
    """(N, 3, H, W) normalized -> (N, H, W, 3) uint8."""
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    img = (x.float() * s + m).clamp(0, 1) * 255
    return img.permute(0, 2, 3, 1).round().byte().cpu().numpy()


@torch.no_grad()
def mix_examples(mixer, x: torch.Tensor, lam: float = 0.5):
    """(partner images, mask s in [0, 1], mixed images) for a batch, partner = the next image."""
    n = x.shape[0]
    perm = torch.roll(torch.arange(n, device=x.device), -1)
    was_training = mixer.training
    mixer.eval()
    # Loaders emit bf16/fp16 images on CUDA with amp: run the encoder under the same autocast.
    with torch.autocast(x.device.type, dtype=x.dtype, enabled=x.dtype != torch.float32):
        f = mixer.momentum_encoder.forward_features(x, stages=mixer.mix_stage)
        logits = mixer.mix_block(f, lam, perm)
    x_mix, _ = mixer.mix_block.mix(logits, x, perm)
    s = reference.upsample_mask(logits, tuple(x.shape[-2:]), mixer.mix_block.mode)
    mixer.train(was_training)
    return x[perm], s, x_mix


def diverse_batch(loader, num: int, max_batches: int = 20) -> torch.Tensor:
    """`num` images of different classes where the first batches have them (val sets are often
    sorted by class, so the first batch alone would show one class)."""
    picked, seen, spare = [], set(), []
    for i, (x, y) in enumerate(loader):
        for img, label in zip(x, y.tolist()):
            (spare if label in seen else picked).append(img)
            seen.add(label)
        if len(picked) >= num or i + 1 >= max_batches:
            break
    return torch.stack((picked + spare)[:num])


def write_mix_grid(mixer, loader, path, spec, num: int = 8, lam: float = 0.5) -> Path:
    """Rows: image, partner, mask (white = partner), mixed; `num` columns; small images scaled up."""
    from PIL import Image

    x = diverse_batch(loader, num)
    partner, s, x_mix = mix_examples(mixer, x, lam)
    rows = [_to_uint8(t, spec.mean, spec.std) for t in (x, partner)]
    rows.append(np.repeat((s[:, 0].cpu().numpy() * 255).round().astype(np.uint8)[..., None], 3, axis=-1))
    rows.append(_to_uint8(x_mix, spec.mean, spec.std))
    n, h, w = rows[0].shape[:3]
    pad = 2
    grid = np.full((4 * (h + pad) + pad, n * (w + pad) + pad, 3), 255, np.uint8)
    for r, row in enumerate(rows):
        for c in range(n):
            y0, x0 = pad + r * (h + pad), pad + c * (w + pad)
            grid[y0 : y0 + h, x0 : x0 + w] = row[c]
    image = Image.fromarray(grid)
    scale = max(1, 256 // max(h, 1))
    if scale > 1:
        image = image.resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("." + path.name + ".tmp")
    image.save(tmp, format="PNG")
    tmp.replace(path)
    return path
