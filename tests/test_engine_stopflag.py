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
