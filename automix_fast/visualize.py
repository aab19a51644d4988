"""A labelled PNG of what the Mix Block does, and the mask statistics behind it.

Columns are pairs (an image and its partner, named by class); rows are the image, the partner,
then for each lambda the mask (a colour scale of the partner weight s, with a colour bar) and
the mixed sample. A Mix Block that sees lambda (`lam_concat`) is shown at several lambdas; one
that does not gives the same mask at every lambda, so it is shown once.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch

from automix_fast.ops import reference
from automix_fast.atomic import write_bytes
from automix_fast.mixing.automix import mask_statistics

LAMS_SEEN = (0.2, 0.5, 0.8)  # lambdas shown when the Mix Block takes lambda as an input
LAM_DEFAULT = 0.5
# Viridis at five stops: dark (s = 0, the image itself) to yellow (s = 1, all partner).
_STOPS = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], np.float32)


def colorize(s: np.ndarray) -> np.ndarray:
    """s in [0, 1], any shape -> uint8 RGB of the same shape plus a last axis of 3."""
    pos = np.clip(s, 0.0, 1.0) * (len(_STOPS) - 1)
    lo = np.minimum(pos.astype(np.int64), len(_STOPS) - 2)
    frac = (pos - lo)[..., None]
    return np.round(_STOPS[lo] * (1 - frac) + _STOPS[lo + 1] * frac).astype(np.uint8)


def _to_uint8(x: torch.Tensor, mean, std) -> np.ndarray:
    """(N, 3, H, W) normalized -> (N, H, W, 3) uint8."""
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    img = (x.float() * s + m).clamp(0, 1) * 255
    return img.permute(0, 2, 3, 1).round().byte().cpu().numpy()


def shown_lambdas(mixer) -> tuple[float, ...]:
    return LAMS_SEEN if mixer.mix_block.lam_concat else (LAM_DEFAULT,)


@torch.no_grad()
def mix_examples(mixer, x: torch.Tensor, lam: float = LAM_DEFAULT):
    """(partner images, mask s in [0, 1], mixed images, statistics) for a batch, partner = the
    next image; the statistics are those the training logs (mixing.automix.mask_statistics)."""
    n = x.shape[0]
    perm = torch.roll(torch.arange(n, device=x.device), -1)
    was_training = mixer.training
    mixer.eval()
    # Loaders emit bf16/fp16 images on CUDA with amp: run the encoder under the same autocast.
    with torch.autocast(x.device.type, dtype=x.dtype, enabled=x.dtype != torch.float32):
        f = mixer.momentum_encoder.forward_features(x, stages=mixer.mix_stage)
        logits = mixer.mix_block(f, lam, perm)
    x_mix, s_mean = mixer.mix_block.mix(logits, x, perm)
    s = reference.upsample_mask(logits, tuple(x.shape[-2:]), mixer.mix_block.mode)
    stats = {k: float(v) for k, v in mask_statistics(logits, s_mean, lam).items()}
    mixer.train(was_training)
    return x[perm], s, x_mix, stats


def stats_line(lam: float, stats: dict) -> str:
    return (f"lam {lam:.2f}: partner weight {stats['mask_partner_mean']:.3f} (target {stats['mask_partner_target']:.3f})"
            f"  pixel std {stats['mask_pixel_std']:.3g}  image std {stats['mask_image_std']:.3g}"
            f"  saturated {100 * stats['mask_saturated']:.1f}%")


def diverse_batch(loader, num: int, max_batches: int = 50) -> tuple[torch.Tensor, list[int]]:
    """`num` images of different classes where the first batches have them (val sets are often
    sorted by class, so the first batch alone would show one class), and their labels."""
    picked, seen, spare = [], set(), []
    for i, (x, y) in enumerate(loader):
        for img, label in zip(x, y.tolist()):
            (spare if label in seen else picked).append((img, label))
            seen.add(label)
        if len(picked) >= num or i + 1 >= max_batches:
            break
    chosen = (picked + spare)[:num]
    return torch.stack([img for img, _ in chosen]), [label for _, label in chosen]


def next_free_path(folder, stem: str = "mixes", suffix: str = ".png") -> Path:
    """folder/mixes.png, or mixes-1.png, mixes-2.png ... : the first name not taken, so a new
    picture never replaces an earlier one."""
    folder = Path(folder)
    path, i = folder / f"{stem}{suffix}", 0
    while path.exists():
        i += 1
        path = folder / f"{stem}-{i}{suffix}"
    return path


def _fit(text: str, width_px: int, char_px: int = 6) -> str:
    limit = max(width_px // char_px, 3)
    return text if len(text) <= limit else text[: limit - 1] + "."


def write_mix_grid(mixer, loader, path, spec, num: int = 8, lam: float | None = None,
                   classes=None) -> tuple[Path, list[str]]:
    """Write the labelled grid to `path`; returns (path, one statistics line per lambda)."""
    from PIL import Image, ImageDraw, ImageFont
    from PIL.PngImagePlugin import PngInfo

    lams = (lam,) if lam is not None else shown_lambdas(mixer)
    x, labels = diverse_batch(loader, num)
    n, h, w = x.shape[0], x.shape[-2], x.shape[-1]
    scale = max(1, -(-64 // max(h, 1)))  # tiles at least 64 px, room for the labels
    th, tw = h * scale, w * scale
    images = _to_uint8(x, spec.mean, spec.std)
    rows, names, lines = [], [], []
    for i, lam_i in enumerate(lams):
        partner, s, x_mix, stats = mix_examples(mixer, x, lam_i)
        if i == 0:
            rows += [images, _to_uint8(partner, spec.mean, spec.std)]
            names += ["image", "partner"]
        rows += [colorize(s[:, 0].float().cpu().numpy()), _to_uint8(x_mix, spec.mean, spec.std)]
        names += [f"mask lam={lam_i:.2f}", f"mix lam={lam_i:.2f}"]
        lines.append(stats_line(lam_i, stats))

    def name(label: int) -> str:
        return str(classes[label]) if classes is not None and 0 <= label < len(classes) else str(label)

    pairs = [(name(labels[c]), name(labels[(c + 1) % n])) for c in range(n)]
    pad, left, top, bar_w, right = 4, 96, 44, 14, 56
    width = left + n * (tw + pad) + pad + bar_w + right
    height = top + len(rows) * (th + pad) + pad
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    draw.text((4, 2), "mask: partner weight s (lam = the image's own share)", fill="black", font=font)
    for c, (a, b) in enumerate(pairs):  # column headers: the image's class + its partner's
        x0 = left + pad + c * (tw + pad)
        draw.text((x0, 16), _fit(a, tw), fill="black", font=font)
        draw.text((x0, 28), _fit("+ " + b, tw), fill="black", font=font)
    for r, (row, label) in enumerate(zip(rows, names)):
        y0 = top + pad + r * (th + pad)
        draw.text((4, y0 + th // 2 - 6), label, fill="black", font=font)
        for c in range(n):
            tile = Image.fromarray(row[c]).resize((tw, th), Image.NEAREST)
            canvas.paste(tile, (left + pad + c * (tw + pad), y0))
    # Colour bar for the mask rows: s = 1 at the top, 0 at the bottom.
    bx, by0, by1 = left + n * (tw + pad) + pad, top + pad, height - pad
    ramp = colorize(np.linspace(1.0, 0.0, by1 - by0, dtype=np.float32)[:, None].repeat(bar_w, 1))
    canvas.paste(Image.fromarray(ramp), (bx, by0))
    for value in (1.0, 0.5, 0.0):
        ty = by0 + round((1.0 - value) * (by1 - by0 - 1))
        draw.line([(bx + bar_w, ty), (bx + bar_w + 3, ty)], fill="black")
        draw.text((bx + bar_w + 5, min(max(ty - 6, 0), height - 12)), f"s={value:g}", fill="black", font=font)
    meta = PngInfo()  # machine-readable labels: tests and scripts need not read pixels
    meta.add_text("lambdas", ",".join(f"{v:g}" for v in lams))
    meta.add_text("pairs", ";".join(f"{a}+{b}" for a, b in pairs))
    meta.add_text("rows", ";".join(names))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG", pnginfo=meta)
    path = write_bytes(path, buf.getvalue(), "mask picture")  # a full disk or a read-only folder: one line
    return path, lines
