"""The DALI loader's decoding process: CPU-only pipelines run here, so a native crash ends this
process and not the run (the loader side is `DaliFolderLoader` in dali.py).

DALI 2.4's CPU decoder can still crash on header damage the screening (jpeg_header.py) does not
predict. In CPU-only mode the loader therefore starts one decoding process per loader (a fresh
interpreter running `dali_child.main`: DALI is not fork-safe once initialized,
and nothing of the parent's `__main__` runs again) and talks to it over two pipes
(`multiprocessing.connection.Connection` over inherited file descriptors):

    parent -> child   ("setup", pipeline args, batch size, paths, labels)  once, before the first command
                      ("epoch", seed, [(k, indices), ...], copies)        run these planned batches
                      ("abandon",)                                        the consumer left the epoch
                      ("probe", seed, [index, ...], copies)                decode files one at a time
    child -> parent   ("ready",) | ("fail", why)                           after the imports
                      ("batch", k, shape, labels) + the float32 NHWC bytes  one per planned batch
                      ("end",)                                            the epoch is over (or abandoned)
                      ("error", reason, [k fed, not sent])                 the pipeline raised; it is dropped
                      ("ok", i) | ("bad", i, reason), then ("probed",)     per probed file

`copies` maps a sample index to the file DALI reads instead (bad_files.py: a repaired JPEG or a
Pillow PNG). The child builds its pipeline (dali_pipelines.build_pipeline) with the seed of the
first epoch command after it has none, as the in-process loader builds its own, so the batches
are the same either way. When the parent goes away the child reads EOF and exits; it ignores
SIGINT and SIGTERM (a Ctrl-C or a job's end is the training process's to handle).

Test hook: with `AUTOMIX_FAST_DALI_CRASH` set, the child kills itself, to stand in for a
decoder crash that no real file reproduces reliably:
    file:NAME           SIGSEGV whenever it is about to decode a file whose name is NAME
    batch:K:MARKER      SIGKILL when it is about to decode epoch batch K (0-based) and the file
                        MARKER does not exist yet (it is created first: the kill happens once)
    batch:K             SIGKILL every time it is about to decode epoch batch K
Normal runs never set it.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import weakref
from multiprocessing.connection import Connection

from ..errors import DataError

CRASH_ENV = "AUTOMIX_FAST_DALI_CRASH"
PREFETCH_DEPTH = 2  # batches DALI prepares ahead of the one being consumed


def dali_reason(error: Exception) -> str:
    """The operator and the first line of what it encountered, from DALI's multi-line error."""
    text = str(error)
    lines = [ln.strip() for ln in text.splitlines()]
    operator = next((ln.split("`")[1].replace("nvidia.dali.", "") for ln in lines if ln.startswith("Error in") and "`" in ln), "")
    after = text.split("encountered:", 1)[1] if "encountered:" in text else text
    what = next((ln.strip() for ln in after.splitlines() if ln.strip() and not ln.startswith(("C++ context", "Current pipeline"))), "")
    return f"{operator}: {what}" if operator else what or type(error).__name__


# The child's entry: the working directory off sys.path, so this package (first on PYTHONPATH) is the one imported.
_ENTRY = "import sys; del sys.path[0]; from automix_fast.data.dali_child import main; sys.exit(main(sys.argv[1:]))"


class ChildDied(Exception):
    """The decoding process ended without answering (a native crash, a kill); str() says how."""


# ----------------------------------------------------------------------------- parent side

class DecodingProcess:
    """One decoding process serving one loader; started at once, set up at its first command."""

    def __init__(self, args: dict, batch_size: int, paths: list[str], labels):
        # The file names' own bytes (os.fsencode): a name need not be valid UTF-8.
        self._setup = ("setup", args, batch_size, [os.fsencode(p) for p in paths], labels)
        child_in, to_child = os.pipe()
        from_child, child_out = os.pipe()
        package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _ENTRY, str(child_in), str(child_out)],
                pass_fds=(child_in, child_out), env=env, stdin=subprocess.DEVNULL)
        finally:
            os.close(child_in)
            os.close(child_out)
        self._send_conn, self._recv_conn = Connection(to_child, readable=False), Connection(from_child, writable=False)
        self._ready = False
        self._finalizer = weakref.finalize(self, _stop, self.proc, self._send_conn, self._recv_conn)

    def close(self) -> None:
        self._finalizer()

    def how_it_ended(self) -> str:
        try:
            code = self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return "stopped answering"
        if code < 0:
            try:
                return f"was killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"was killed by signal {-code}"
        return f"exited with status {code}"

    def _died(self) -> ChildDied:
        error = ChildDied(self.how_it_ended())
        self.close()
        return error

    def send(self, *message) -> None:
        try:
            if not self._ready:
                answer = self.recv()
                if answer[0] != "ready":
                    self.close()
                    raise DataError(f"the DALI decoding process could not start: {answer[1]}")
                self._ready = True
                self._send_conn.send(self._setup)
            self._send_conn.send(message)
        except (BrokenPipeError, ConnectionResetError, EOFError, OSError):
            raise self._died() from None

    def recv(self):
        try:
            return self._recv_conn.recv()
        except (EOFError, ConnectionResetError, OSError):
            raise self._died() from None

    def recv_into(self, array) -> None:
        """The bytes that follow a ("batch", ...) message, straight into `array` (C-contiguous)."""
        try:
            self._recv_conn.recv_bytes_into(memoryview(array).cast("B"))
        except (EOFError, ConnectionResetError, OSError):
            raise self._died() from None

    def discard(self) -> None:
        """Skip the bytes that follow a ("batch", ...) message."""
        try:
            self._recv_conn.recv_bytes()
        except (EOFError, ConnectionResetError, OSError):
            raise self._died() from None


def _stop(proc, *conns) -> None:
    for conn in conns:
        conn.close()
    if proc.poll() is None:
        proc.kill()  # nothing in the child outlives it: its pipeline and threads go with it
    proc.wait()


# ----------------------------------------------------------------------------- child side

class _Server:
    def __init__(self, inp: Connection, out: Connection):
        self.inp, self.out = inp, out
        self.pipe = None
        self.feed = iter(())
        self.fed: list[int] = []
        self.one: list[int] = []
        self.copies: dict[int, str] = {}
        hook = os.environ.get(CRASH_ENV, "")
        self.crash = hook.split(":", 2) if hook else None

    def serve(self) -> None:
        import numpy as np

        self.np = np
        while True:
            try:
                message = self.inp.recv()
            except EOFError:  # the loader is gone
                return
            if message[0] == "setup":
                _, self.args, self.batch_size, self.paths, self.labels = message
            elif message[0] == "epoch":
                self.epoch(*message[1:])
            elif message[0] == "probe":
                self.probe(*message[1:])
            # ("abandon",) between epochs: the epoch it meant had already ended

    def _encoded(self, idx):
        np = self.np
        paths = [os.fsencode(self.copies[i]) if i in self.copies else self.paths[i] for i in idx]
        return [np.frombuffer(p, dtype=np.uint8) for p in paths], self.labels[idx]

    def _hook(self, k: int | None, idx) -> None:
        if self.crash is None:
            return
        if self.crash[0] == "file":
            if any(os.path.basename(os.fsdecode(self.paths[i])) == self.crash[1] for i in idx if i not in self.copies):
                os.kill(os.getpid(), signal.SIGSEGV)
        elif self.crash[0] == "batch" and k == int(self.crash[1]):
            if len(self.crash) == 3:
                if os.path.exists(self.crash[2]):
                    return
                open(self.crash[2], "w").close()
            os.kill(os.getpid(), signal.SIGKILL)

    def _source(self):
        k, idx = next(self.feed)  # StopIteration ends the pipeline's epoch
        self.fed.append(k)
        self._hook(k, idx)
        return self._encoded(idx)

    def _probe_source(self):
        if not self.one:
            raise StopIteration
        idx = [self.one.pop()]
        self._hook(None, idx)
        return self._encoded(self.np.asarray(idx, dtype=self.np.int64))

    def _build(self, source, batch_size: int, prefetch: int, seed: int):
        from . import dali_pipelines as P

        return P.build_pipeline(self.args, source=source, batch_size=batch_size, prefetch=prefetch, seed=seed)

    def epoch(self, seed: int, planned, copies) -> None:
        import ctypes


        np = self.np
        self.copies, self.feed, self.fed = copies, iter(planned), []
        if self.pipe is None:
            self.pipe = self._build(self._source, self.batch_size, PREFETCH_DEPTH, seed)
        done = 0
        while True:
            if self.inp.poll():  # ("abandon",): finish the pipeline's epoch quietly and rewind it
                self.inp.recv()
                self._drain()
                break
            try:
                images, labels = self.pipe.run()
            except StopIteration:
                self.pipe.reset()
                break
            except RuntimeError as e:  # the pipeline is unusable now; the parent finds the file
                reason = dali_reason(e)
                del e
                self.pipe = None
                self.out.send(("error", reason, self.fed[done:]))
                return
            shape = (len(images), *images[0].shape())
            array = np.empty(shape, dtype=np.float32)
            images.copy_to_external(ctypes.c_void_p(array.ctypes.data))
            self.out.send(("batch", self.fed[done], shape, np.array(labels.as_tensor(), dtype=np.int64).reshape(-1)))
            self.out.send_bytes(memoryview(array).cast("B"))
            done += 1
        self.out.send(("end",))

    def _drain(self) -> None:
        self.feed = iter(())
        try:
            while True:
                self.pipe.run()
        except StopIteration:
            self.pipe.reset()
        except RuntimeError:  # a prefetched batch held a failing file: found when it is read again
            self.pipe = None

    def probe(self, seed: int, indices, copies) -> None:
        """Decode each file alone in a batch-1 pipeline (one file per pipeline epoch, so nothing is
        read ahead: a crash happens on the file not yet answered for)."""

        self.copies = copies
        probe = None
        for i in indices:
            if probe is None:
                probe = self._build(self._probe_source, 1, 1, seed)
            self.one = [i]
            try:
                while True:
                    probe.run()
            except StopIteration:
                probe.reset()
                self.out.send(("ok", i))
            except RuntimeError as e:
                reason = dali_reason(e)
                del e
                probe = None
                self.out.send(("bad", i, reason))
        del probe
        self.out.send(("probed",))


def main(argv: list[str]) -> int:
    # Ctrl-C reaches the terminal's whole process group, and job schedulers signal every process
    # of a job: the training process handles those signals (it finishes the step and writes a
    # checkpoint), and ends this one by closing its pipes or SIGKILL. Here they would only print a
    # KeyboardInterrupt traceback and cost a restart of the decoder for the batches still owed.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    inp, out = Connection(int(argv[0]), writable=False), Connection(int(argv[1]), readable=False)
    try:
        try:
            from . import dali_pipelines  # noqa: F401  (the imports are most of the start-up time)
        except Exception as e:  # noqa: BLE001 - reported to the loader as one line
            out.send(("fail", f"{type(e).__name__}: {e}"))
            return 1
        out.send(("ready",))
        _Server(inp, out).serve()
    except (BrokenPipeError, ConnectionResetError):  # the loader went away (before or mid-answer): nothing to say
        pass
    return 0
