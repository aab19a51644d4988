"""SIGTERM / Ctrl-C during training: finish the step, save, print how to continue."""
from __future__ import annotations

import os
import signal
import sys
import time

# A SIGINT this soon after the first signal is the same Ctrl-C arriving again: under torchrun a
# worker gets it from the terminal (the whole foreground group) and from torchrun's forwarding.
REPEAT_GRACE_S = 2.0


class StopFlag:
    """Set by SIGTERM/SIGINT; the loop checks it at each step boundary. The first signal decides;
    a SIGINT at least REPEAT_GRACE_S after it aborts (one sooner is the same Ctrl-C again), other
    repeats change nothing. Only in the process that installed it: a process forked after that
    (a data-loader worker, which Ctrl-C reaches with the whole foreground group) inherits the
    handler, which does nothing there; the main process stops the workers."""

    def __init__(self, clock=time.monotonic):
        self.signal = None
        self._clock = clock
        self._first_at = None  # clock() at the first signal
        self._previous = {}
        self._pid = None  # the process that installed the handler

    def __call__(self) -> bool:
        return self.signal is not None

    @property
    def name(self) -> str:
        # Under torchrun another rank may have been signalled first: this one still stops with it.
        return signal.Signals(self.signal).name if self.signal is not None else "a signal to another rank"

    def _handle(self, signum, frame):
        if os.getpid() != self._pid:
            return
        if self.signal is not None:
            if signum == signal.SIGINT and self._clock() - self._first_at >= REPEAT_GRACE_S:
                raise KeyboardInterrupt
            return
        self.signal, self._first_at = signum, self._clock()
        print(f"\nreceived {signal.Signals(signum).name}: saving a checkpoint at the end of this step", file=sys.stderr, flush=True)

    def install(self):
        self._pid = os.getpid()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. called from a test runner thread)
                pass
        return self

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
