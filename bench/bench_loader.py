"""Loader throughput: the DALI loader against the torch loaders, in images per second.

Cases (each runs `--batches` timed batches after `--warmup` batches, train augmentation):
  imagenet/*  an ImageNet-like folder (JPEGs of varied sizes around 500x375, generated once into
              --cache-dir), 224 px random-resized-crop + flip + normalize:
              dali (DaliFolderLoader) vs torch (StreamingLoader: PIL in DataLoader workers).
  cifar/*     32 px JPEGs: the CIFAR-10 JPEG folder (--data-dir: a folder holding test/ or
              train/ of class folders, or the cifar10-*.tar.gz archives, unpacked into
              --cache-dir), or without --data-dir the embedded dataset's train split (CIFAR's
              size and layout, generated once); pad-4 crop + flip + normalize:
              dali-folder (DALI decodes the JPEGs every epoch), dali-memory (a DALI
              external_source pipeline over the decoded uint8 arrays: crop pad 4 + flip +
              normalize), torch-resident (ResidentLoader: decoded once, batched gather + crop +
              flip on the device; the one-time decode is reported apart), torch-stream.
The device is --device (cpu: DALI's CPU-only mode). Without NVIDIA DALI the DALI cases are
skipped, each listed under `skipped` with the reason. Results: JSON in output/bench/ (--out to
choose) (loader-<device>-<date>.json) with the machine, versions and git commit, rewritten after
every case, and a table on stdout.

    python bench/bench_loader.py --data-dir DATA/cifar10-jpeg --device cpu --workers 2
"""
from __future__ import annotations

import argparse
import datetime
import gc
import os
import sys
import tarfile
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import environment, results_path  # noqa: E402

from automix_fast.atomic import write_json  # noqa: E402
from automix_fast.data import DataSpec  # noqa: E402
from automix_fast.data.folder import scan_image_folder  # noqa: E402
from automix_fast.data.embedded import ensure_embedded_dataset  # noqa: E402

# ----------------------------------------------------------------------------- data


def _make_jpeg(root: str, i: int, classes: int, seed: int) -> None:
    rng = np.random.default_rng([seed, i])  # one stream per image: the same folder whatever the process count
    w = int(np.clip(rng.normal(500, 60), 200, 900))
    h = int(np.clip(w * rng.choice([0.75, 1.0, 1.333, 0.66]), 150, 900))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.empty((h, w, 3), np.float32)
    for c in range(3):  # smooth random waves + texture noise: realistic JPEG sizes
        fx, fy, ph = rng.uniform(0.005, 0.05), rng.uniform(0.005, 0.05), rng.uniform(0, 6.3)
        img[..., c] = 128 + 90 * np.sin(xx * fx + yy * fy + ph)
    img += rng.normal(0, 12, img.shape).astype(np.float32)
    folder = os.path.join(root, f"c{i % classes:02d}")
    os.makedirs(folder, exist_ok=True)
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(os.path.join(folder, f"{i:05d}.jpg"), quality=90)


def make_imagenet_like(root: str, count: int, classes: int = 10, seed: int = 0, processes: int = 1) -> str:
    """`count` JPEGs (quality 90, 4:2:0) of varied sizes around 500x375 in root/<class>/, once
    (`processes` worker processes write them)."""
    done = os.path.join(root, f".done-{count}")
    if os.path.exists(done):
        return root
    if processes > 1:
        with ProcessPoolExecutor(processes) as pool:
            list(pool.map(_make_jpeg, *zip(*((root, i, classes, seed) for i in range(count))), chunksize=16))
    else:
        for i in range(count):
            _make_jpeg(root, i, classes, seed)
    open(done, "w").close()
    return root


def cifar_folder(data_dir: str, cache_dir: str) -> str:
    """A CIFAR-10 JPEG split folder: data_dir/test (or train), or unpacked from data_dir/cifar10-test.tar.gz."""
    for split in ("test", "train"):
        if os.path.isdir(os.path.join(data_dir, split)):
            return os.path.join(data_dir, split)
    archive = os.path.join(data_dir, "cifar10-test.tar.gz")
    if not os.path.exists(archive):
        sys.exit(f"no test/ or train/ folder or cifar10-test.tar.gz in {data_dir}")
    dest = os.path.join(cache_dir, "cifar10-jpeg")
    if not os.path.isdir(os.path.join(dest, "test")):
        os.makedirs(dest, exist_ok=True)
        with tarfile.open(archive) as tar:
            tar.extractall(dest, filter="data")
    return os.path.join(dest, "test")


def balanced_prefix(samples, count: int):
    """The first count // classes samples of every class."""
    per_class = max(1, count // (max(y for _, y in samples) + 1))
    taken: dict[int, int] = {}
    out = []
    for path, y in samples:
        if taken.get(y, 0) < per_class:
            taken[y] = taken.get(y, 0) + 1
            out.append((path, y))
    return out


# ----------------------------------------------------------------------------- timing

def time_loader(loader, warmup: int, batches: int) -> dict:
    """Images per second over `batches` batches after `warmup` batches (the epoch restarts if short)."""
    seen, t0, epoch, step = 0, None, 0, 0
    while True:
        loader.set_epoch(epoch)
        for x, _ in loader:
            if step == warmup:
                t0, seen = time.perf_counter(), 0
            elif step > warmup:
                seen += x.shape[0]
            step += 1
            if step > warmup + batches:
                if x.is_cuda:
                    torch.cuda.synchronize()
                dt = time.perf_counter() - t0
                return {"img_per_s": round(seen / dt, 1), "images": seen, "seconds": round(dt, 3)}
        epoch += 1


class DaliMemoryLoader:
    """DALI external_source pipeline over uint8 NHWC arrays: crop with 4 px pad + flip + normalize.

    Only for this measurement (the in-memory choice in automix_fast/data/dali.py rests on it).
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, spec: DataSpec):
        from nvidia.dali import fn, pipeline_def, types

        from automix_fast.data.dali import dali_mode

        self.images, self.labels, self.spec = images, labels, spec
        self.bs = spec.batch_size
        self.device_id = dali_mode(spec)
        self.gpu = self.device_id is not None
        size, pad = images.shape[1], 4
        self._order = iter(())

        @pipeline_def(batch_size=self.bs, num_threads=max(1, spec.workers), device_id=self.device_id,
                      seed=spec.seed, prefetch_queue_depth=2)
        def pipe():
            img, lab = fn.external_source(source=self._source, num_outputs=2, batch=True, layout=["HWC", ""])
            if self.gpu:
                img = img.gpu()
            shift = fn.random.uniform(values=list(range(-pad, pad + 1)), shape=[2], dtype=types.INT32)
            img = fn.slice(img, start=shift, shape=[size, size], axis_names="HW", out_of_bounds_policy="pad")
            img = fn.crop_mirror_normalize(img, dtype=types.FLOAT, output_layout="HWC",
                                           mean=[255 * m for m in spec.mean], std=[255 * s for s in spec.std],
                                           mirror=fn.random.coin_flip())
            return img, lab

        self.pipe = pipe()
        self.pipe.build()

    def _source(self):
        idx = next(self._order)
        return [self.images[i] for i in idx], self.labels[idx]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        from automix_fast.data.dali import _copy_out

        n = len(self.labels) // self.bs * self.bs
        perm = np.random.default_rng(self.epoch).permutation(len(self.labels))[:n]
        self._order = (perm[i:i + self.bs] for i in range(0, n, self.bs))
        for _ in range(n // self.bs):
            img, lab = self.pipe.run()
            out = torch.empty((self.bs, *img[0].shape()), dtype=torch.float32,
                              device=f"cuda:{self.device_id}" if self.gpu else "cpu")
            _copy_out(img, out, torch.cuda.current_stream() if self.gpu else None)
            yield out.permute(0, 3, 1, 2).to(self.spec.device), torch.from_numpy(np.array(lab.as_tensor()))
        try:
            while True:
                self.pipe.run()
        except StopIteration:
            self.pipe.reset()


def train_step_rate(spec: DataSpec, args) -> dict:
    """A CIFAR ResNet-18 train step (forward, backward, SGD) on random data: the rate a loader must beat."""
    from automix_fast.models import create_model

    model = create_model("resnet18_cifar", 10).to(spec.device, memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    batch = spec.batch_size if spec.device.type == "cuda" else 64  # a CPU step is slow: keep it short
    x = torch.randn(batch, 3, 32, 32, device=spec.device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device=spec.device)
    steps = 3 if x.is_cuda else 2
    for i in range(steps + 1):
        if i == 1:
            if x.is_cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        with torch.autocast(spec.device.type, dtype=torch.bfloat16, enabled=x.is_cuda):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if x.is_cuda:
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return {"case": "cifar/train-step", "img_per_s": round(steps * batch / dt, 1), "model": "resnet18_cifar", "batch": batch}


# ----------------------------------------------------------------------------- environment

def loader_environment(device: torch.device) -> dict:
    import PIL

    return {**environment(device), "pillow": PIL.__version__}


# ----------------------------------------------------------------------------- main

def workers_arg(text: str) -> int:
    """--workers: a count, or 'all' for every CPU this process may use."""
    if text == "all":
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a count or 'all', got {text!r}") from None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", default=None,
                    help="CIFAR-10 JPEG folder or archives (default: the embedded dataset's train split)")
    ap.add_argument("--cache-dir", default=os.path.join(os.path.expanduser("~"), ".cache", "automix-fast", "bench"))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--imagenet-count", type=int, default=2000, help="images in the generated ImageNet-like folder")
    ap.add_argument("--cifar-count", type=int, default=10000, help="CIFAR images used (a class-balanced prefix)")
    ap.add_argument("-b", "--batch-size", type=int, default=64)
    ap.add_argument("--cifar-batch-size", type=int, default=256)
    ap.add_argument("--workers", type=workers_arg, default=2,
                    help="DALI threads and torch DataLoader workers; 'all': every CPU this process may use")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--only", default="", help="comma-separated case names to run (default: all)")
    ap.add_argument("--out", default=None, help="JSON path (default output/bench/loader-<device>-<date>.json)")
    args = ap.parse_args(argv)

    from automix_fast.data.dali import DaliFolderLoader, dali_available
    from automix_fast.data.torch_loader import ResidentLoader, StreamingLoader, _ImageDataset, decode_folder

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    only = {c for c in args.only.split(",") if c}
    dali = dali_available()
    results, skipped = [], []
    record = {
        "benchmark": "loader",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": str(device),
        "environment": loader_environment(device),
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "cache_dir")},
        "cifar_source": "folder" if args.data_dir else "embedded",
        "image_dtype": str(dtype),
        "results": results,
        "skipped": skipped,
    }
    out = args.out or str(results_path("loader", device.type))

    def save():
        write_json(out, record)

    def wanted(case: str) -> bool:
        return not only or case in only

    def run(case: str, make, **extra):
        if not wanted(case):
            return
        if case.split("/")[1].startswith("dali") and not dali:
            skipped.append({"case": case, "reason": "NVIDIA DALI is not installed (nvidia.dali does not import)"})
            print(f"{case:24s} skipped: NVIDIA DALI is not installed", flush=True)
            save()
            return
        t = time.perf_counter()
        loader = make()
        setup = time.perf_counter() - t
        r = {"case": case, **time_loader(loader, args.warmup, args.batches), "setup_s": round(setup, 3),
             "batch_size": loader_batch(case), "workers": args.workers, **extra}
        del loader
        gc.collect()  # DALI pipelines sit in reference cycles: free them before DataLoader workers fork
        results.append(r)
        save()
        print(f"{case:24s} {r['img_per_s']:>10.1f} img/s   (setup {setup:.2f} s)", flush=True)

    def loader_batch(case: str) -> int:
        return args.batch_size if case.startswith("imagenet/") else args.cifar_batch_size

    # ImageNet-like folder at 224 px.
    if any(wanted(c) for c in ("imagenet/dali", "imagenet/torch-stream")):
        inet = make_imagenet_like(os.path.join(args.cache_dir, f"imagenet-like-{args.imagenet_count}"), args.imagenet_count,
                                  processes=max(1, args.workers))
        _, inet_samples = scan_image_folder(inet)
        spec = DataSpec(img_size=224, batch_size=args.batch_size, workers=args.workers, device=device,
                        channels_last=True, dtype=dtype, aug="imagenet")
        run("imagenet/dali", lambda: DaliFolderLoader(inet_samples, spec, True, "imagenet"))
        run("imagenet/torch-stream", lambda: StreamingLoader(_ImageDataset(samples=inet_samples, size=224, mode="rrc"),
                                                             spec, True, "imagenet"))

    # CIFAR-10 JPEGs at 32 px.
    cifar_cases = ("cifar/dali-folder", "cifar/dali-memory", "cifar/torch-resident", "cifar/torch-stream", "cifar/train-step")
    if any(wanted(c) for c in cifar_cases):
        if args.data_dir:
            cifar_dir = cifar_folder(args.data_dir, args.cache_dir)
        else:
            cifar_dir = os.path.join(ensure_embedded_dataset(), "train")
        _, cifar_samples = scan_image_folder(cifar_dir)
        cifar_samples = balanced_prefix(cifar_samples, args.cifar_count)
        cspec = DataSpec(img_size=32, batch_size=args.cifar_batch_size, workers=args.workers, device=device,
                         channels_last=True, dtype=dtype, aug="cifar")
        run("cifar/dali-folder", lambda: DaliFolderLoader(cifar_samples, cspec, True, "cifar"))
        if any(wanted(c) for c in ("cifar/dali-memory", "cifar/torch-resident")):
            t = time.perf_counter()
            arrays = decode_folder(cifar_samples, 32, threads=args.workers)
            decode_s = time.perf_counter() - t
            print(f"{'cifar/one-time decode':24s} {len(cifar_samples) / decode_s:>10.1f} img/s   "
                  f"({decode_s:.2f} s, PIL, {args.workers} threads)")
            run("cifar/dali-memory", lambda: DaliMemoryLoader(arrays[0], arrays[1], cspec))
            run("cifar/torch-resident", lambda: ResidentLoader(torch.from_numpy(arrays[0]), torch.from_numpy(arrays[1]),
                                                               cspec, True, "cifar"),
                one_time_decode_s=round(decode_s, 3))
        run("cifar/torch-stream", lambda: StreamingLoader(_ImageDataset(samples=cifar_samples, size=32, mode="fixed"),
                                                          cspec, True, "cifar"))
        if wanted("cifar/train-step"):
            results.append(train_step_rate(cspec, args))
            save()
            print(f"{'cifar/train-step':24s} {results[-1]['img_per_s']:>10.1f} img/s   (resnet18_cifar fwd+bwd+SGD, for scale)")

    save()
    print("\n| case | img/s |\n| --- | ---: |")
    for r in results:
        print(f"| {r['case']} | {r['img_per_s']:.0f} |")
    for r in skipped:
        print(f"| {r['case']} | skipped: {r['reason']} |")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
