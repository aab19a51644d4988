"""NVIDIA DALI loaders (`--loader dali`): the loader contract of docs/INTERNALS.md over DALI pipelines.

DALI is an optional extra, imported only inside functions: `dali_available()` says whether it is
installed, and asking for the DALI loader without it is a one-line ConfigError with the install
command. The pipeline definitions are in `dali_pipelines.py`.

Modes. GPU mode when spec.device is CUDA and CUDA is available: DALI runs on that device
(`device_id` = its index), decodes with device "mixed" (nvJPEG + hardware JPEG decoder), augments
on the GPU, and the batch is copied once, on torch's current stream, into a fresh torch tensor.
CPU-only mode otherwise (spec.device is cpu, or no CUDA): `device_id=None`, cpu operators
(libjpeg-turbo decode), CPU tensors moved with `.to(spec.device)`; the pipeline runs in a
decoding process of its own (dali_child.py, started when the loader is built; `ISOLATE_CPU`),
which sends each batch back over a pipe, so a native crash of DALI's decoder cannot end the
run (see below). The batches are the ones the pipeline makes in this process. DALI's thread
count is spec.workers (at least 1).

Order, sharding, epochs. The loader plans every batch in Python and hands DALI one batch of file
paths (and labels) per iteration through an external source; DALI's threads read
(`fn.io.file.read`), decode and augment. The plan is shards.py's, the torch loader's too, so both
loaders see the same samples in the same order for a given (seed, epoch, rank): train batches
are whole (the remainder is dropped, LastBatchPolicy.DROP semantics) and equal in count on every
rank; val slices are contiguous, the last batch smaller, every sample seen exactly once over all
ranks, with no padding and no repeats. `fn.readers.file(shard_id, num_shards, random_shuffle,
pad_last_batch)` is not used: its shuffle is a fixed global pre-shuffle plus a 1024-sample
buffer (epochs would not be a function of (seed, epoch), and set_epoch could not change them
without a rebuild), without padding its shards wrap into the next epoch mid-batch, and with
padding the repeated samples must be stripped again; the external source makes all of that
exact and keeps one pipeline alive for the whole run.

Reproducibility: the sample order of epoch e is a function of (seed, e) alone, resumed runs
included. The random crop and flip draws come from DALI's per-pipeline random streams, seeded
from (seed, rank, first epoch iterated): a run started at epoch 0 repeats exactly (DALI's random
operators draw per sample, so the thread count does not matter), but a run resumed at epoch e
draws different crops than the uninterrupted run did; reseeding would mean rebuilding the
pipeline every epoch (nvJPEG and buffer start-up each time). A resume inside an epoch
(`start_at(b)`) feeds the plan from batch b: no file of the batches done is read, and batches b,
b+1, ... hold the uninterrupted run's files and labels in its order, but their crops and flips
are the next draws of the pipeline's streams, not the uninterrupted run's. DALI's random
operators draw in sequence per sample slot, and image_random_crop's number of draws depends on
each image's shape, so the draws of the skipped batches cannot be spent without decoding them;
replaying those batches would restore the draws only for a resume inside the first epoch the
pipeline ran (in any later epoch they already differ, as above), at the cost of decoding them.

Files that fail to decode (bad_files.py, jpeg_header.py). When the loaders are built, every JPEG's
header is screened and a file DALI's parser would reject is read from a repaired copy: after a
parser error in a batch of 32+, DALI 2.4 can crash the process, so such files never reach a
pipeline. Any other failure inside a pipeline (`pipe.run()` raises) is handled in `_recover`:
the failed batch's files are decoded one at a time in a batch-1 copy of this pipeline, each
failing file is decoded with Pillow (a PNG copy) or left out, the pipeline is rebuilt and the
epoch resumes at the failed batch. Nothing runs per batch for this on a clean dataset. In
CPU-only mode the same happens through the decoding process, which also survives a crash the
screening did not predict: when the process dies (a signal, e.g. SIGSEGV), the batch it owed
and the PREFETCH_DEPTH after it are decoded file by file in a new process (the file a process
dies on is tried alone once more, so a kill from outside blames no file), the file that crashes
it is recorded as one that failed, and the plan restarts at that batch. A death that no file
explains restarts the process at the same batch, at most MAX_RESTARTS times an epoch, then the
run stops with one line. The process starts when the loader is built, so its start-up overlaps
whatever the run does before the first batch (cost: bench/README.md).

In-memory data. CIFAR arrays (info.train_arrays) go to the torch loader's device-resident
loader (`ResidentLoader`, through `build_torch_loaders`: one gather plus one batched
pad-crop-flip per batch on the device, the very augmentation `--loader torch` applies, with the
data already in device memory on a GPU); the measurements behind this choice are in
bench/README.md. Image folders always run through DALI, small images included (the embedded
set).
"""
from __future__ import annotations

import os
import weakref

import numpy as np
import torch

from ..errors import ConfigError, DataError
from .bad_files import BadFiles, decode_reason
from .dali_child import PREFETCH_DEPTH, ChildDied, DecodingProcess, dali_reason
from .jpeg_header import header_problem
from .shards import Shards
from .torch_loader import build_torch_loaders, resolve_aug

INSTALL_HINT = 'pip install "automix-fast[dali]" (CUDA 13; "automix-fast[dali-cuda120]" for CUDA 12)'
# CPU-only mode decodes in a child process (dali_child.py) so a native decoder crash cannot end the
# run; False runs the pipeline in this process, as GPU mode always does (the tests compare the two).
ISOLATE_CPU = True
MAX_RESTARTS = 3  # decoding-process deaths per epoch that no file explains before the run stops


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

        self.spec, self.train, self.aug = spec, train, aug
        self.paths = [p for p, _ in samples]
        self.labels = np.array([y for _, y in samples], dtype=np.int64)
        self.batch_size = spec.batch_size if train else spec.eval_batch_size
        self.device = torch.device(spec.device)
        self.device_id = dali_mode(spec)
        self.shards = Shards(len(samples), spec, train)
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
        self._isolated = self.device_id is None and ISOLATE_CPU
        self._child = self._start_child() if self._isolated else None  # its start-up overlaps what comes next

    # -- the contract surface
    def __len__(self) -> int:
        return len(self.shards)

    @property
    def num_samples(self) -> int:
        return self.shards.num_samples

    @property
    def epoch(self) -> int:
        return self.shards.epoch

    def set_epoch(self, epoch: int) -> None:
        self.shards.set_epoch(epoch)

    def start_at(self, batch: int) -> None:
        """The next iteration starts at batch `batch` of the current epoch, reading no file of the
        batches before it: the torch loaders' contract (torch_loader._LoaderBase) for the order,
        labels and batches; the crop and flip draws are the pipeline's own (see the module doc)."""
        self.shards.start_at(batch)

    def indices(self) -> np.ndarray:
        """This rank's sample indices for the current epoch, in reading order."""
        return self.shards.indices().numpy()

    # -- the pipeline
    def _encoded(self, idx):
        """(encoded paths, labels) of one planned batch; a file DALI cannot decode is read from its Pillow copy."""
        if self.bad_files.has_copies:
            paths = [self.bad_files.read_path(self.paths[i]) for i in idx]
        else:  # a clean run: no per-batch work
            paths = [self.paths[i] for i in idx]
        return [np.frombuffer(os.fsencode(p), dtype=np.uint8) for p in paths], self.labels[idx]

    def _source(self):
        """External source: the next planned batch as (encoded paths, labels); StopIteration ends the epoch."""
        k, idx = next(self._plan)
        self._fed.append((k, idx))
        return self._encoded(idx)

    def _pipeline_args(self) -> dict:
        """The picklable description `dali_pipelines.build_pipeline` builds this loader's pipeline from."""
        s = self.spec
        return dict(train=self.train, gpu=self.device_id is not None, img_size=s.img_size, aug=self.aug,
                    crop_pct=s.crop_pct, interpolation=s.filter_for(self.train),
                    crop_padding_mode=s.crop_padding_mode, mean=tuple(s.mean), std=tuple(s.std), half=self._half,
                    num_threads=max(1, int(s.workers)), device_id=self.device_id)

    def _seed(self) -> int:
        # A rebuilt pipeline (after a decode failure) draws from a new stream: a stream cannot
        # be wound forward to where the failed pipeline stood.
        s = self.spec
        return _pipeline_seed(s.seed, s.rank, self.epoch, int(self.train), self._rebuilds)

    def _build(self, source=None, batch_size: int | None = None, prefetch: int = PREFETCH_DEPTH):
        from . import dali_pipelines as P

        return P.build_pipeline(self._pipeline_args(), source=source or _PlanSource(self),
                                batch_size=batch_size or self.batch_size, prefetch=prefetch, seed=self._seed())

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
        first = self.shards.take_start()
        idx = self.indices()
        if len(idx) == 0:  # e.g. a val slice of an empty rank
            return
        if self._isolated:
            yield from self._iter_isolated(idx, first)
            return
        if self._pipe is not None and self._in_flight:
            self._drain()  # the previous epoch was abandoned part way
        if self._pipe is None:
            self._pipe = self._build()
        bs = self.batch_size
        self._order = idx
        batches = [idx[i:i + bs] for i in range(0, len(idx), bs)]
        self._start_plan(batches, first)
        self._in_flight = True
        done = 0  # batches yielded since the plan last (re)started: self._fed[done] is the next out
        while True:
            failure = None
            try:
                images, labels = self._pipe.run()
            except StopIteration:  # the plan is exhausted and every fed batch was yielded
                break
            except RuntimeError as e:  # how DALI reports an operator error; the pipeline is now unusable
                failure = dali_reason(e)
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
        if not self._record_failing(suspects, self._find_failing):
            raise DataError(f"the DALI pipeline failed in batch {k + 1} of an epoch, but no single file of it "
                            f"fails alone: {failure}")
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
                reason = dali_reason(e)
            del probe  # only one pipeline alive at a time
            if reason is not None:
                queue[:0] = fed[out + 1:]  # fed after the failing file but never checked
                failing.append(self._failing(fed[out], reason))
        return failing

    def _record_failing(self, suspects: list[np.ndarray], find) -> bool:
        """Record the failing files `find` names in the first of the suspect batches that has any
        (the failed batch first: a prefetched batch may be the one that failed); False if none."""
        found = []
        for idx in suspects:
            found = find(idx)
            if found:
                break
        for path, reason, try_pillow in found:
            self.bad_files.record(path, reason, try_pillow)
        return bool(found)

    def _failing(self, i: int, reason: str | None, crash: str | None = None) -> tuple[str, str, bool]:
        """(path, reason, try Pillow) for sample i, which DALI failed on (`reason`) or crashed on."""
        path = self.paths[i]
        was_pillow = self.bad_files.drop_copy(path)  # even its Pillow copy fails: nothing else to try
        why = f"DALI {decode_reason(reason, path)}" if crash is None else f"DALI crashed: its decoding process {crash}"
        return path, why, not was_pillow

    # -- CPU-only mode: the pipeline runs in a decoding process (dali_child.py)
    def _start_child(self) -> DecodingProcess:
        return DecodingProcess(self._pipeline_args(), self.batch_size, self.paths, self.labels)

    def _process(self) -> DecodingProcess:
        if self._child is None:
            self._child = self._start_child()
        return self._child

    def _copies(self) -> dict[int, str]:
        """Sample index -> the file DALI reads instead (bad_files.py), for the decoding process."""
        bad = self.bad_files
        if not bad.has_copies:
            return {}
        copied = {p for p in bad.entries if bad.read_path(p) != p}
        return {i: bad.read_path(p) for i, p in enumerate(self.paths) if p in copied}

    def _iter_isolated(self, idx: np.ndarray, first: int):
        """__iter__ through the decoding process. Its failures are handled as `_recover` handles a
        pipeline's: an error names the batches it had been fed; a death (a native crash, a kill)
        makes the batch being waited for and the PREFETCH_DEPTH after it the suspects. Either way
        the culprit is searched for file by file in a decoding process, recorded, and the plan
        restarts at that batch in a new pipeline; a death no file explains just restarts, at most
        MAX_RESTARTS times an epoch."""
        if self._in_flight:
            self._abandon()  # the previous epoch was left part way
        bs = self.batch_size
        self._order = idx
        batches = [idx[i:i + bs] for i in range(0, len(idx), bs)]
        self._in_flight = True
        try:
            yield from self._stream_isolated(batches, first)
        except DataError:
            self._in_flight = False  # the decoding process is idle: no epoch of its own to stop
            raise
        self._in_flight = False
        if not self.bad_files.in_run:
            self.bad_files.announce_screened()

    def _stream_isolated(self, batches: list[np.ndarray], first: int):
        planned, pos, send, deaths = list(self._planned(batches, first)), 0, True, 0
        while True:
            failure = died = None
            try:
                child = self._process()
                if send:
                    child.send("epoch", self._seed(), planned, self._copies())
                    send = False
                message = child.recv()
                if message[0] == "batch":
                    nhwc = torch.empty(message[2], dtype=torch.float32)
                    child.recv_into(nhwc.numpy())
            except ChildDied as e:
                died, self._child = str(e), None
            else:
                if message[0] == "end":
                    break
                if message[0] == "error":
                    failure, fed = message[1], message[2]
                    if not fed:  # no batch to blame (not a file's fault): one line, no traceback
                        raise DataError(f"the DALI pipeline failed: {failure}")
            if died is not None and pos == len(planned):  # every batch is out: the next epoch starts a new process
                break
            if died is not None or failure is not None:
                deaths += self._recover_isolated(planned[pos:pos + (PREFETCH_DEPTH + 1 if died else len(fed))],
                                                 failure, died)
                if deaths > MAX_RESTARTS:
                    raise DataError(f"the DALI decoding process {died} {deaths} times in epoch {self.epoch + 1}, and no "
                                    "file it was decoding fails alone; not restarting it again")
                planned, pos, send = list(self._planned(batches, planned[pos][0])), 0, True
                continue
            pos += 1
            yield self._finish(nhwc, torch.from_numpy(message[3]))

    def _recover_isolated(self, suspects: list, failure: str | None, died: str | None) -> int:
        """Find, record and plan around the file(s) of `suspects` ((k, indices), the failed batch
        first) that failed; 1 when the process died and no file explains it, else 0."""
        import time

        t0 = time.perf_counter()
        k = suspects[0][0]
        found = self._record_failing([i for _, i in suspects], self._find_failing_isolated)
        if not found and died is None:
            raise DataError(f"the DALI pipeline failed in batch {k + 1} of an epoch, but no single file of it "
                            f"fails alone: {failure}")
        self._rebuilds += 1
        self.bad_files.recoveries += 1
        self.bad_files.recovery_seconds += time.perf_counter() - t0
        return int(not found)

    def _find_failing_isolated(self, idx: np.ndarray) -> list[tuple[str, str, bool]]:
        """`_find_failing` in a decoding process: each file alone; the file a process dies on is
        tried once more alone in a new one, so a kill from outside does not blame it."""
        queue = [int(i) for i in idx]
        failing = []
        while queue:
            try:
                child = self._process()
                child.send("probe", self._seed(), queue, self._copies())
                while (answer := child.recv())[0] != "probed":
                    i = queue.pop(0)
                    if answer[0] == "bad":
                        failing.append(self._failing(i, answer[2]))
            except ChildDied:
                self._child = None
                i = queue.pop(0)
                try:
                    child = self._process()
                    child.send("probe", self._seed(), [i], self._copies())
                    answer = child.recv()
                    child.recv()  # ("probed",)
                except ChildDied as again:
                    self._child = None
                    failing.append(self._failing(i, None, crash=str(again)))
                    continue
                if answer[0] == "bad":
                    failing.append(self._failing(i, answer[2]))
        return failing

    def _abandon(self) -> None:
        """Stop the decoding process's current epoch (its pipeline finishes and rewinds there)."""
        self._in_flight = False
        if self._child is None:
            return
        try:
            self._child.send("abandon")
            while (message := self._child.recv())[0] not in ("end", "error"):
                self._child.discard()  # a batch no one asked for any more
        except ChildDied:
            self._child = None

    def _to_torch(self, images, labels):
        n = len(images)
        size = self.spec.img_size
        gpu = self.device_id is not None
        dtype = torch.float16 if self._half else torch.float32
        where = torch.device("cuda", self.device_id) if gpu else torch.device("cpu")
        nhwc = torch.empty((n, size, size, 3), dtype=dtype, device=where)
        _copy_out(images, nhwc, torch.cuda.current_stream(where) if gpu else None)
        return self._finish(nhwc, torch.from_numpy(np.array(labels.as_tensor(), dtype=np.int64).reshape(n)))

    def _finish(self, nhwc: torch.Tensor, y: torch.Tensor):
        """NHWC batch and labels -> the contract's (images, labels) on spec.device."""
        x = nhwc.permute(0, 3, 1, 2)  # NCHW shape over the NHWC buffer: channels_last, no copy
        fmt = torch.channels_last if self.spec.channels_last else torch.contiguous_format
        x = x.to(device=self.device, dtype=self.spec.dtype, memory_format=fmt, non_blocking=True)
        return x, y.to(self.device, non_blocking=True)


def screen_jpeg_headers(paths: list[str], bad_files, threads: int = 16) -> None:
    """Record every JPEG whose header DALI's parser rejects (jpeg_header.py) before any pipeline
    runs: a decode error inside DALI can crash the process, so these never reach one. Reads only
    the headers, on threads (the work is I/O: a few small reads per file)."""
    from concurrent.futures import ThreadPoolExecutor


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
        return [np.frombuffer(os.fsencode(paths[i]), dtype=np.uint8) for i in idx], np.asarray(idx, dtype=np.int64)

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
