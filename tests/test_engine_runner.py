"""engine/runner.py's pure helpers (the runs themselves: test_engine_distributed, test_resume_cli, ...)."""
from automix_fast.engine.runner import batch_text


def test_batch_text_says_how_the_global_batch_is_made():
    assert batch_text(256, 1, 1) == "256"
    assert batch_text(32, 8, 1) == "32 x 8 procs = 256"
    assert batch_text(64, 1, 2) == "64 x 2 accum = 128"
    assert batch_text(32, 4, 2) == "32 x 4 procs x 2 accum = 256"
