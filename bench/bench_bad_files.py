"""What a file that fails to decode costs the DALI loader, and what a clean folder pays.

Three runs over the same generated ImageNet-like folder (JPEGs around 320x240, random-resized-crop
to --img-size), DALI train loader built as `build_dali_loaders` builds it (JPEG header screening
first), no model step:
- clean: screening time, then img/s per epoch (the mid-run handling of
  automix_fast/data/bad_files.py only runs after a pipeline raised);
- odd: --bad files with `FF 00` after SOI (DALI's parser rejects them, Pillow reads them): the
  screening finds them and writes repaired copies; no pipeline ever fails;
- unreadable: --bad files whose scan names an undefined Huffman table (no decoder reads them; the
  screening cannot see it): epoch 1 finds them mid-run (one pipeline failure each: the failed batch's files
  re-decoded one at a time on a batch-1 pipeline, the pipeline rebuilt), epoch 2 plans around them.
Per failure: seconds from the pipeline's error to the rebuilt pipeline (BadFiles.recovery_seconds /
recoveries), what a failure costs on top of the epoch.

    python bench/bench_bad_files.py                       # CPU-only DALI
    python bench/bench_bad_files.py --device cuda --workers 8 -b 128
"""
from __future__ import annotations

import argparse
import io
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write_results  # noqa: E402

from automix_fast.data import DataSpec  # noqa: E402
from automix_fast.data.bad_files import BadFiles  # noqa: E402


def _jpeg(rng: np.random.Generator) -> bytes:
    h, w = int(rng.integers(220, 260)), int(rng.integers(300, 340))
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([x / w * 255, y / h * 255, (x + y) / (w + h) * 255], -1) + rng.normal(0, 20, (h, w, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _folder(root: str, n: int, bad: int, kind: str) -> list[str]:
    os.makedirs(root)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        path = os.path.join(root, f"{i:05d}.jpg")
        data = _jpeg(rng)
        if kind != "clean" and i % (n // bad) == n // bad // 2:  # spread over the epoch
            if kind == "odd":  # DALI's parser rejects it, Pillow reads it
                data = data[:2] + b"\xff\x00" + data[2:]
            else:  # the scan names Huffman table 3, never defined: passes the screening, no decoder reads it
                at = data.find(b"\xff\xda")
                data = bytearray(data)
                for k in range(data[at + 4]):
                    data[at + 6 + 2 * k] = 0x33
                data = bytes(data)
        with open(path, "wb") as f:
            f.write(data)
        paths.append(path)
    return paths


def _run(paths: list[str], args, device: torch.device) -> dict:
    from automix_fast.data.dali import DaliFolderLoader, screen_jpeg_headers

    spec = DataSpec(img_size=args.img_size, batch_size=args.batch_size, workers=args.workers, device=device, seed=0,
                    skip_bad_images=True)
    bad = BadFiles(True, announce=False)
    t0 = time.perf_counter()
    screen_jpeg_headers(paths, bad, threads=max(4, args.workers))
    screening = time.perf_counter() - t0
    loader = DaliFolderLoader([(p, 0) for p in paths], spec, True, "imagenet", bad)
    epochs = []
    for epoch in range(args.epochs):
        loader.set_epoch(epoch)
        t0 = time.perf_counter()
        n = sum(x.shape[0] for x, _ in loader)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
        epochs.append({"images": n, "seconds": round(seconds, 4), "img_per_s": round(n / seconds, 1)})
    per_failure = bad.recovery_seconds / bad.recoveries if bad.recoveries else None
    return {"screening_seconds": round(screening, 4), "screening_us_per_file": round(1e6 * screening / len(paths), 1),
            "epochs": epochs, "bad_files": len(bad), "recoveries": bad.recoveries,
            "recovery_seconds": round(bad.recovery_seconds, 4),
            "seconds_per_failure": None if per_failure is None else round(per_failure, 4)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--bad", type=int, default=4, help="bad files in the odd and unreadable folders")
    p.add_argument("-b", "--batch-size", type=int, default=32)
    p.add_argument("--img-size", type=int, default=112)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--output", default=None)
    args = p.parse_args()
    device = torch.device(args.device)
    results = {}
    tmp = tempfile.mkdtemp(prefix="bench-bad-files-")
    try:
        for kind in ("clean", "odd", "unreadable"):
            paths = _folder(os.path.join(tmp, kind), args.images, args.bad, kind)
            results[kind] = _run(paths, args, device)
            r = results[kind]
            print(f"{kind:11s} screening {r['screening_us_per_file']} us/file  img/s per epoch "
                  f"{[e['img_per_s'] for e in r['epochs']]}  bad {r['bad_files']}  failures {r['recoveries']}  "
                  f"s/failure {r['seconds_per_failure']}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    env = environment(device)
    path = write_results("bad-files", env, {"args": vars(args), "results": results}, args.output)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
