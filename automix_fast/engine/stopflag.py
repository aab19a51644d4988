"""SIGTERM / Ctrl-C during training: finish the step, save, print how to continue."""
from __future__ import annotations

import os
import signal
import sys


class StopFlag:
    """Set by SIGTERM/SIGINT; the loop checks it at each step boundary. A second SIGINT aborts.
    Only in the process that installed it: a process forked after that (a data-loader worker,
    which Ctrl-C reaches with the whole foreground group) inherits the handler, which does
    nothing there; the main process stops the workers."""

    def __init__(self):
        self.signal = None
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
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum
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
