"""CompileClock: the seconds torch.compile spends compiling, counted by dynamo's compile
callbacks while the clock is entered, and its note (one line per epoch that compiled). The
clock it reads is conftest's stand-in (`stand_in_compile_clock`), under which every window
lasts WINDOW = 1.5 s: the sums are counts of windows and the notes exact, not timings."""
from __future__ import annotations

import pytest
import torch

from automix_fast.engine.compile_clock import CompileClock

WINDOW = 1.5  # conftest.STAND_IN_WINDOW, checked by the fixture below


@pytest.fixture(autouse=True)
def stand_in(stand_in_compile_clock):
    assert stand_in_compile_clock == WINDOW


def _compiled():
    """A fresh function compiled with the eager backend for fixed shapes (a new shape recompiles)."""
    torch._dynamo.reset()

    def f(x):
        return x.sin() + 1

    return torch.compile(f, backend="eager", dynamic=False)


def test_counts_each_compilation_once_and_notes_only_new_ones():
    f = _compiled()
    with CompileClock() as clock:
        assert clock.note() is None  # nothing compiled yet
        f(torch.ones(3))
        f(torch.ones(3))  # cached: no second compilation
        assert clock.counts == {("frame", "traced"): 1} and clock.seconds == WINDOW
        assert clock.note() == "torch.compile warm-up: 1.5 s compiling in this epoch (1 frame traced)"
        assert clock.note() is None
        f(torch.ones(4))
        f(torch.ones(5))
        assert clock.counts == {("frame", "traced"): 3}
        assert clock.note() == ("torch.compile warm-up: 3.0 s compiling in this epoch (2 frames traced); "
                                "4.5 s in the run")
    f(torch.ones(6))  # after exit: the callbacks are gone
    assert clock.counts == {("frame", "traced"): 3} and clock.seconds == 3 * WINDOW and clock.note() is None


def test_a_backward_compiled_at_its_first_use_is_its_own_window():
    torch._dynamo.reset()
    model = torch.nn.Linear(4, 2)
    compiled = torch.compile(model, backend="aot_eager", dynamic=False)
    with CompileClock() as clock:
        compiled(torch.randn(3, 4)).sum().backward()
    assert clock.counts.get(("frame", "traced")) == 1
    assert clock.counts.get(("backward graph", "compiled")) == 1  # at the first backward, not with the forward
    assert clock.note() == ("torch.compile warm-up: 3.0 s compiling in this epoch (1 frame traced, 1 backward graph "
                            "compiled)")
