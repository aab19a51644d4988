"""The stop flag set by SIGTERM/Ctrl-C: set, and said once, in the process that installed it;
a process forked after that (a data-loader worker) inherits the handler and ignores it."""
from __future__ import annotations

import io
import os
import signal
import sys

import pytest

from automix_fast.engine.stopflag import StopFlag


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_ignores_the_signal_and_the_installing_process_stops(capsys):
    stop = StopFlag().install()
    try:
        pid = os.fork()
        if pid == 0:  # the child: what a loader worker forked after install() does on Ctrl-C
            code = 1
            try:
                sys.stderr = io.StringIO()
                os.kill(os.getpid(), signal.SIGINT)
                code = 0 if sys.stderr.getvalue() == "" and not stop() else 3
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0  # 3: it printed or set its flag
        assert not stop() and capsys.readouterr().err == ""
        os.kill(os.getpid(), signal.SIGINT)
        assert stop() and stop.name == "SIGINT"
        assert "received SIGINT: saving a checkpoint at the end of this step" in capsys.readouterr().err
    finally:
        stop.restore()


def test_the_same_ctrl_c_arriving_twice_stops_and_a_later_one_aborts(capsys):
    """Under torchrun a worker gets one Ctrl-C twice (from the terminal and forwarded by
    torchrun): a SIGINT within REPEAT_GRACE_S of the first signal changes nothing, a later one
    aborts; other repeats (SIGTERM) never abort."""
    from automix_fast.engine.stopflag import REPEAT_GRACE_S

    now = [100.0]
    stop = StopFlag(clock=lambda: now[0]).install()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop() and stop.name == "SIGINT"
        now[0] += REPEAT_GRACE_S / 2
        os.kill(os.getpid(), signal.SIGINT)  # the forwarded copy: no abort, no second line
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.name == "SIGINT"
        assert capsys.readouterr().err.count("received") == 1
        now[0] += REPEAT_GRACE_S
        os.kill(os.getpid(), signal.SIGTERM)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        stop.restore()
