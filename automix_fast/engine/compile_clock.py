"""The wall time torch.compile spends compiling during a run: its warm-up, reported as one line
after each epoch that compiled and as `compile_seconds` in the run's summary."""
from __future__ import annotations

import time

_now = time.perf_counter  # the clock read at each window's start and end (tests substitute one)


class CompileClock:
    """Sums the seconds during which a torch.compile compilation is in progress in this process.

    dynamo runs its start callbacks when a compilation begins with none pending and its end
    callbacks when the last pending one ends (torch._dynamo.callback), so a compilation that
    starts inside another is part of the outer one's time and count. Each such window is counted
    by what started it: a frame dynamo traces (usually one graph), a backward graph compiled at
    its first use, or a CUDA-graph recording of the reduce-overhead mode.

    Use as a context manager: the callbacks are process-wide, registered on enter and removed
    on exit.
    """

    def __init__(self):
        self.seconds = 0.0  # compiling, since enter
        self.counts: dict[tuple, int] = {}  # window kind (noun, participle) -> windows, since enter
        self._reported: tuple[float, dict] = (0.0, {})  # (seconds, counts) at the last note
        self._started: tuple[float, str] | None = None
        self._handler = None

    def __enter__(self) -> "CompileClock":
        from torch._dynamo.callback import callback_handler

        self._handler = callback_handler
        callback_handler.register_start_callback(self._start)
        callback_handler.register_end_callback(self._end)
        return self

    def __exit__(self, *exc) -> None:
        if self._handler is not None:
            self._handler.remove_start_callback(self._start)
            self._handler.remove_end_callback(self._end)
            self._handler = None

    def _start(self, args) -> None:
        self._started = (_now(), _KINDS.get(args.callback_trigger.name, ("other compilation", "")))

    def _end(self, _args) -> None:
        if self._started is not None:
            t0, kind = self._started
            self.seconds += _now() - t0
            self.counts[kind] = self.counts.get(kind, 0) + 1
            self._started = None

    def note(self) -> str | None:
        """One line on the compilations since the last note (None: there was none)."""
        seconds, before = self.seconds - self._reported[0], self._reported[1]
        new = {kind: n - before.get(kind, 0) for kind, n in self.counts.items() if n > before.get(kind, 0)}
        if not new:
            return None
        first = not before
        self._reported = (self.seconds, dict(self.counts))
        what = ", ".join(f"{n} {noun}{'s' * (n != 1)}{' ' * bool(done)}{done}" for (noun, done), n in new.items())
        line = f"torch.compile warm-up: {seconds:.1f} s compiling in this epoch ({what})"
        return line if first else f"{line}; {self.seconds:.1f} s in the run"


# dynamo's CallbackTrigger names -> what the note calls a window they start: (noun, participle)
_KINDS = {"DYNAMO": ("frame", "traced"), "LAZY_BACKWARD": ("backward graph", "compiled"),
          "CUDAGRAPH_RECORDING": ("CUDA-graph recording", ""), "TRITON_AUTOTUNING": ("autotuning run", "")}
