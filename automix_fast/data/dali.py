"""NVIDIA DALI loaders (`--loader dali`): the loader contract of docs/INTERNALS.md over DALI pipelines.

DALI is an optional extra, imported only inside functions: `dali_available()` says whether it is
installed, and asking for the DALI loader without it is a one-line ConfigError with the install
command. The pipeline definitions are in `dali_pipelines.py`.

Modes. GPU mode when spec.device is CUDA and CUDA is available: DALI runs on that device
(`device_id` = its index), decodes with device "mixed" (nvJPEG + hardware JPEG decoder), augments
on the GPU, and the batch is copied once, on torch's current stream, into a fresh torch tensor.
CPU-only mode otherwise (spec.device is cpu, or no CUDA): `device_id=None`, cpu operators
(libjpeg-turbo decode), CPU tensors moved with `.to(spec.device)`. DALI's thread count is
spec.workers (at least 1).

Order, sharding, epochs. The loader plans every batch in Python and hands DALI one batch of file
paths (and labels) per iteration through an external source; DALI's threads read
(`fn.io.file.read`), decode and augment. The plan is the torch loader's own
(`torch_loader.train_indices` / `val_range`), so both loaders see the same samples in the same
order for a given (seed, epoch, rank):
- train: one permutation of the whole set per (seed, epoch), the same on every rank; rank r takes
  every world_size-th index from r; every rank gets N // world_size // batch_size full batches
  (equal counts keep DDP in step); the remainder is dropped (LastBatchPolicy.DROP semantics).
- val: rank r reads its contiguous slice in order; the last batch is simply smaller. Every sample
  is seen exactly once over all ranks, with no padding and no repeats.
This replaces `fn.readers.file(shard_id, num_shards, random_shuffle, pad_last_batch)`, measured
against in this session: its shuffle is a fixed global pre-shuffle plus a 1024-sample buffer
(epochs are not a function of (seed, epoch), and set_epoch could not change them without a
rebuild), without padding its shards wrap into the next epoch mid-batch, and with padding the
repeated samples must be stripped again; the external source makes all of that exact and keeps
one pipeline alive for the whole run.

Reproducibility: the sample order of epoch e is a function of (seed, e) alone, resumed runs
included. The random crop and flip draws come from DALI's per-pipeline random streams, seeded
from (seed, rank, first epoch iterated): a run started at epoch 0 repeats exactly (DALI's random
operators draw per sample, so the thread count does not matter), but a run resumed at epoch e
draws different crops than the uninterrupted run did; reseeding would mean rebuilding the
pipeline every epoch (nvJPEG and buffer start-up each time).

Files that fail to decode (bad_files.py, jpeg_header.py). When the loaders are built, every JPEG's
header is screened and a file DALI's parser would reject is read from a repaired copy: after a
parser error in a batch of 32+, DALI 2.4 can crash the process, so such files never reach a
pipeline. Any other failure inside a pipeline (`pipe.run()` raises) is handled in `_recover`:
the failed batch's files are decoded one at a time in a batch-1 copy of this pipeline, each
failing file is decoded with Pillow (a PNG copy) or left out, the pipeline is rebuilt and the
epoch resumes at the failed batch. Nothing runs per batch for this on a clean dataset.

In-memory data. CIFAR arrays (info.train_arrays) go to the torch loader's device-resident
loader (`ResidentLoader`, through `build_torch_loaders`: one gather plus one batched pad-crop-flip per batch on the device),
chosen by measurement against a DALI external_source pipeline over the same arrays (pad-4 crop +
flip + normalize). bench/bench_loader.py, CPU-only mode, 2 shared AMD EPYC cores, 32 px, batch
256 (bench/results/loader-cpu-2026-11-23.json; two runs, the second in brackets):
    DALI external_source over the uint8 arrays        13,900 (10,700) img/s
    resident loader                                    1,580  (1,480) img/s
    DALI decoding the CIFAR-10 JPEG folder each epoch  4,380  (4,160) img/s
    torch streaming loader over the JPEG folder          890    (850) img/s
    a ResNet-18 (CIFAR) training step, for scale           9 img/s
DALI is faster on the CPU, but both loaders run 150x+ faster than the training step there, so
the loader is under 1% of a CPU step either way; on a GPU the resident loader's data already
lives in device memory (no host work, no host-to-device copy per batch) and it applies the very
augmentation `--loader torch` does. So the resident loader, for both modes; the bench keeps the
DALI case so a GPU measurement can overturn this. Image folders always run through DALI, small
images included (the embedded set): there DALI was the fastest folder loader measured
(ImageNet-like 224 px: DALI 243 (226) img/s against the torch loader's 89 (186) img/s).
"""
from __future__ import annotations

import weakref

import numpy as np
import torch

from ..errors import ConfigError, DataError
from .bad_files import decode_reason

INSTALL_HINT = 'pip install "automix-fast[dali]" (CUDA 13; "automix-fast[dali-cuda120]" for CUDA 12)'
PREFETCH_DEPTH = 2  # batches DALI prepares ahead of the one being consumed


def dali_available() -> bool:
    """True when nvidia.dali (and its PyTorch plugin) can be imported."""
    try:
        import nvidia.dali  # noqa: F401
        import nvidia.dali.plugin.pytorch  # noqa: F401
    except ImportError:
        return False
    return True


def require_dali() -> None:
    if not dali_available():
        raise ConfigError(f"--loader dali needs NVIDIA DALI, which is not installed: {INSTALL_HINT}, or use --loader torch")


def dali_mode(spec) -> int | None:
    """DALI device_id: the CUDA device index in GPU mode, None for CPU-only mode."""
    device = torch.device(spec.device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return device.index if device.index is not None else torch.cuda.current_device()


def _pipeline_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0] & 0x7FFFFFFF)


def _copy_out(tensor_list, out: torch.Tensor, stream) -> torch.Tensor:
    """Copy a dense DALI batch into the torch tensor `out` (on `stream` for GPU batches)."""
    import ctypes

    from nvidia.dali.backend import TensorListGPU

    shape = [len(tensor_list), *tensor_list[0].shape()]
    if shape != list(out.shape):
        raise RuntimeError(f"DALI batch shape {shape} does not match {list(out.shape)}")
    ptr = ctypes.c_void_p(out.data_ptr())
    if isinstance(tensor_list, TensorListGPU):
        tensor_list.copy_to_external(ptr, stream.cuda_stream, non_blocking=True)
    else:
        tensor_list.copy_to_external(ptr)
    return out


class _PlanSource:
    """The external-source callable: the loader's next batch, held weakly.

    The pipeline keeps its source alive; a weak reference back to the loader keeps that from
    being a reference cycle, so dropping the loader frees the DALI pipeline (and its threads and
    device buffers) at once rather than at some later garbage collection, and no pipeline
    lingers into a forked DataLoader worker.
    """

    def __init__(self, loader):
        self._loader = weakref.ref(loader)

    def __call__(self):
        loader = self._loader()
        if loader is None:
            raise StopIteration
        return loader._source()


class _OneAtATime:
    """External source of a probe pipeline: the next queued sample index as a batch of one."""

    def __init__(self, loader, queue: list[int], fed: list[int]):
        self.loader, self.queue, self.fed = loader, queue, fed

    def __call__(self):
        if not self.queue:
            raise StopIteration
        self.fed.append(self.queue.pop(0))
        return self.loader._encoded(np.asarray(self.fed[-1:], dtype=np.int64))


class DaliFolderLoader:
    """Train or val loader over a list of (path, label) with a DALI pipeline (see the module doc)."""

    def __init__(self, samples: list[tuple[str, int]], spec, train: bool, aug: str, bad_files=None):
        from .bad_files import BadFiles
        from .torch_loader import train_indices, val_range

        self._train_indices, self._val_range = train_indices, val_range
        self.spec, self.train, self.aug = spec, train, aug
        self.paths = [p for p, _ in samples]
        self.labels = np.array([y for _, y in samples], dtype=np.int64)
        self.batch_size = spec.batch_size if train else spec.eval_batch_size
        self.device = torch.device(spec.device)
        self.device_id = dali_mode(spec)
        self.epoch = 0
        n = len(samples)
        if train and n // spec.world_size < spec.batch_size:
            raise DataError(
                f"train set has {n} images: too few for one batch of {spec.batch_size} on each of {spec.world_size} rank(s)"
            )
        # DALI emits half precision for half-precision runs (half the copy), float32 otherwise;
        # bf16 is one cast on the device (fp16 holds normalized pixels more finely than bf16).
        self._half = self.device_id is not None and spec.dtype in (torch.float16, torch.bfloat16)
        self._pipe = None
        self._plan = iter(())
        self._in_flight = False  # a pipeline epoch was started and not run to its end
        self.bad_files = bad_files if bad_files is not None else BadFiles(spec.skip_bad_images, spec.rank == 0)
        self._fed: list[tuple[int, np.ndarray]] = []  # (epoch batch number, indices) fed, oldest first
        self._order = np.arange(0)  # this epoch's reading order (training refills come from it)
        self._rebuilds = 0

    # -- the contract surface
    def __len__(self) -> int:
        return -(-self.num_samples // self.batch_size)

    @property
    def num_samples(self) -> int:
        n, s = len(self.paths), self.spec
        if self.train:
            return n // s.world_size // self.batch_size * self.batch_size
        start, stop = self._val_range(n, s.rank, s.world_size)
        return stop - start

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def indices(self) -> np.ndarray:
        """This rank's sample indices for the current epoch, in reading order."""
        s = self.spec
        if self.train:
            return self._train_indices(len(self.paths), self.batch_size, s.seed, self.epoch, s.rank, s.world_size).numpy()
        start, stop = self._val_range(len(self.paths), s.rank, s.world_size)
        return np.arange(start, stop)

    # -- the pipeline
    def _encoded(self, idx):
        """(encoded paths, labels) of one planned batch; a file DALI cannot decode is read from its Pillow copy."""
        if self.bad_files.has_copies:
            paths = [self.bad_files.read_path(self.paths[i]) for i in idx]
        else:  # a clean run: no per-batch work
            paths = [self.paths[i] for i in idx]
        return [np.frombuffer(p.encode("utf-8"), dtype=np.uint8) for p in paths], self.labels[idx]

    def _source(self):
        """External source: the next planned batch as (encoded paths, labels); StopIteration ends the epoch."""
        k, idx = next(self._plan)
        self._fed.append((k, idx))
        return self._encoded(idx)

    def _build(self, source=None, batch_size: int | None = None, prefetch: int = PREFETCH_DEPTH):
        from nvidia.dali import types

        from . import dali_pipelines as P

        s = self.spec
        definition = P.train_pipeline if self.train else P.val_pipeline
        pipe = definition(
            source=source or _PlanSource(self),
            gpu=self.device_id is not None,
            img_size=s.img_size,
            aug=self.aug,
            mean=tuple(s.mean),
            std=tuple(s.std),
            out_dtype=types.FLOAT16 if self._half else types.FLOAT,
            batch_size=batch_size or self.batch_size,
            num_threads=max(1, int(s.workers)),
            device_id=self.device_id,
            # A rebuilt pipeline (after a decode failure) draws from a new stream: a stream cannot
            # be wound forward to where the failed pipeline stood.
            seed=_pipeline_seed(s.seed, s.rank, self.epoch, int(self.train), self._rebuilds),
            prefetch_queue_depth=prefetch,
        )
        pipe.build()
        return pipe

    def _drain(self) -> None:
        """Finish the pipeline's current epoch (at most PREFETCH_DEPTH batches) and rewind it."""
        self._plan = iter(())  # no more batches: the source ends the epoch at its next call
        try:
            while True:
                self._pipe.run()
        except StopIteration:
            self._pipe.reset()
        except RuntimeError:  # a prefetched, never-yielded batch holds a failing file: found when read again
            self._pipe = None
        self._in_flight = False

    def _start_plan(self, batches: list[np.ndarray], first: int) -> None:
        """Feed batches[first:] from now on, planned around the known bad files as each is fed."""
        self._plan = self._planned(batches, first)
        self._fed = []

    def _planned(self, batches: list[np.ndarray], first: int):
        bad, order = self.bad_files, self._order if self.train else None
        for k in range(first, len(batches)):
            idx = batches[k]
            if bad.left_out:  # empty unless a file failed: a clean run does no per-batch work here
                idx = np.asarray(bad.plan(idx, self.paths, order), dtype=np.int64)
                if len(idx) == 0:  # a val batch of unreadable files only: nothing to evaluate
                    continue
            yield k, idx

    def __iter__(self):
        idx = self.indices()
        if len(idx) == 0:  # e.g. a val slice of an empty rank
            return
        if self._pipe is not None and self._in_flight:
            self._drain()  # the previous epoch was abandoned part way
        if self._pipe is None:
            self._pipe = self._build()
        bs = self.batch_size
        self._order = idx
        batches = [idx[i:i + bs] for i in range(0, len(idx), bs)]
        self._start_plan(batches, 0)
        self._in_flight = True
        done = 0  # batches yielded since the plan last (re)started: self._fed[done] is the next out
        while True:
            failure = None
            try:
                images, labels = self._pipe.run()
            except StopIteration:  # the plan is exhausted and every fed batch was yielded
                break
            except RuntimeError as e:  # how DALI reports an operator error; the pipeline is now unusable
                failure = _dali_reason(e)
                if done >= len(self._fed):  # no batch to blame (not a file's fault): one line, no traceback
                    raise DataError(f"the DALI pipeline failed: {failure}") from None
            if failure is not None:  # handled outside the except block: its traceback holds the old pipeline
                self._recover(batches, done, failure)
                done = 0
                continue
            done += 1
            yield self._to_torch(images, labels)
        self._pipe.reset()
        self._in_flight = False
        if not self.bad_files.in_run:  # inside a run, the runner's end_epoch names them (after val)
            self.bad_files.announce_screened()

    # -- decode failures (see bad_files.py): only ever entered after a pipeline raised
    def _recover(self, batches: list[np.ndarray], done: int, failure: str) -> None:
        """The fed batch `done` failed: find its failing file(s), record them, rebuild the pipeline and
        restart the plan at that batch. Batches fed after it were never yielded, so nothing is
        skipped or repeated."""
        import time

        t0 = time.perf_counter()
        k = self._fed[done][0]
        suspects = [idx for _, idx in self._fed[done:]]  # the failed batch first, then prefetched ones
        self._pipe = None  # DALI: "Current pipeline object is no longer valid"
        found = []
        for idx in suspects:  # a prefetched batch may be the one that raised (an error reported early)
            found = self._find_failing(idx)
            if found:
                break
        if not found:
            raise DataError(f"the DALI pipeline failed in batch {k + 1} of an epoch, but no single file of it "
                            f"fails alone: {failure}")
        for path, reason, try_pillow in found:
            self.bad_files.record(path, reason, try_pillow)
        self._rebuilds += 1
        self._pipe = self._build()
        self._start_plan(batches, k)
        self.bad_files.recoveries += 1
        self.bad_files.recovery_seconds += time.perf_counter() - t0

    def _find_failing(self, idx: np.ndarray) -> list[tuple[str, str, bool]]:
        """(path, reason, try Pillow) of each file of a fed batch that fails alone in this loader's own
        pipeline (same operators and device, batch size 1); the probe is rebuilt after each failure."""
        queue = [int(i) for i in idx]
        failing = []
        while queue:
            fed: list[int] = []  # what the probe was given, in order (DALI may ask one ahead)
            probe = self._build(source=_OneAtATime(self, queue, fed), batch_size=1, prefetch=1)
            out, reason = 0, None
            try:
                while True:
                    probe.run()
                    out += 1
            except StopIteration:
                pass
            except RuntimeError as e:
                reason = _dali_reason(e)
            del probe  # only one pipeline alive at a time
            if reason is not None:
                path = self.paths[fed[out]]
                queue[:0] = fed[out + 1:]  # fed after the failing file but never checked
                was_pillow = self.bad_files.drop_copy(path)  # even its Pillow copy fails: nothing else to try
                failing.append((path, f"DALI {decode_reason(reason, path)}", not was_pillow))
        return failing

    def _to_torch(self, images, labels):
        n = len(images)
        size = self.spec.img_size
        gpu = self.device_id is not None
        dtype = torch.float16 if self._half else torch.float32
        where = torch.device("cuda", self.device_id) if gpu else torch.device("cpu")
        nhwc = torch.empty((n, size, size, 3), dtype=dtype, device=where)
        _copy_out(images, nhwc, torch.cuda.current_stream(where) if gpu else None)
        y = torch.from_numpy(np.array(labels.as_tensor(), dtype=np.int64).reshape(n))
        x = nhwc.permute(0, 3, 1, 2)  # NCHW shape over the NHWC buffer: channels_last, no copy
        fmt = torch.channels_last if self.spec.channels_last else torch.contiguous_format
        x = x.to(device=self.device, dtype=self.spec.dtype, memory_format=fmt, non_blocking=True)
        return x, y.to(self.device, non_blocking=True)


def _dali_reason(error: Exception) -> str:
    """The operator and the first line of what it encountered, from DALI's multi-line error."""
    text = str(error)
    lines = [ln.strip() for ln in text.splitlines()]
    operator = next((ln.split("`")[1].replace("nvidia.dali.", "") for ln in lines if ln.startswith("Error in") and "`" in ln), "")
    after = text.split("encountered:", 1)[1] if "encountered:" in text else text
    what = next((ln.strip() for ln in after.splitlines() if ln.strip() and not ln.startswith(("C++ context", "Current pipeline"))), "")
    return f"{operator}: {what}" if operator else what or type(error).__name__


def screen_jpeg_headers(paths: list[str], bad_files, threads: int = 16) -> None:
    """Record every JPEG whose header DALI's parser rejects (jpeg_header.py) before any pipeline
    runs: a decode error inside DALI can crash the process, so these never reach one. Reads only
    the headers, on threads (the work is I/O: a few small reads per file)."""
    from concurrent.futures import ThreadPoolExecutor

    from .jpeg_header import header_problem

    if not paths:
        return
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(paths)))) as pool:
        problems = list(pool.map(header_problem, paths, chunksize=256))
    for path, problem in zip(paths, problems):
        if problem is not None:
            bad_files.record_header(path, problem)


def build_dali_loaders(spec, info):
    """(train_loader, val_loader) for `--loader dali`; see the module docstring for what runs where."""
    require_dali()
    from .torch_loader import build_torch_loaders, resolve_aug

    if info.train_samples is None:  # in-memory arrays (CIFAR batches): the torch loader's resident path
        return build_torch_loaders(spec, info)
    aug = resolve_aug(spec)
    bad = info.bad_files
    screen_jpeg_headers([p for p, _ in info.train_samples + info.val_samples], bad, threads=max(4, int(spec.workers)))
    if bad.left_out and not spec.skip_bad_images:
        bad.stop_after_epoch(before_training=True)  # found before training: refused as the pre-check does
    return (DaliFolderLoader(info.train_samples, spec, True, aug, bad),
            DaliFolderLoader(info.val_samples, spec, False, aug, bad))


def decode_images(paths: list[str], device_id: int | None = None, num_threads: int = 1) -> list[np.ndarray]:
    """Decode files with the loaders' decoder and settings: uint8 HWC RGB arrays at their own sizes.

    For tests and debugging (what does DALI make of this file?); device_id=None is CPU-only mode.
    """
    require_dali()
    from . import dali_pipelines as P

    batch = iter([np.arange(i, min(i + 16, len(paths))) for i in range(0, len(paths), 16)])

    def source():
        idx = next(batch)
        return [np.frombuffer(paths[i].encode("utf-8"), dtype=np.uint8) for i in idx], np.asarray(idx, dtype=np.int64)

    pipe = P.decode_pipeline(source=source, gpu=device_id is not None, batch_size=16, num_threads=num_threads,
                             device_id=device_id, prefetch_queue_depth=1)
    pipe.build()
    out: list[np.ndarray] = []
    try:
        while True:
            images, _ = pipe.run()
            if device_id is not None:
                images = images.as_cpu()
            out.extend(np.array(images[i]) for i in range(len(images)))
    except StopIteration:
        pass
    return out
