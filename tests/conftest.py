"""Shared pytest setup.

Without CUDA the Triton kernels run under the interpreter: TRITON_INTERPRET=1 must be set
before triton is first imported, so it is set here, at collection time. With CUDA the same
tests run compiled on the GPU. Tests marked `gpu` need CUDA and are skipped without it.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from automix_fast.data.embedded import ensure_embedded_dataset  # noqa: E402
from faultkit import make_folder  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (compiled Triton kernels, large sizes); skipped without one")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device() -> torch.device:
    """Where parity tests run: the GPU when there is one, else CPU under the Triton interpreter."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """10 classes x 10 train / 2 val images of the embedded set."""
    return ensure_embedded_dataset(str(tmp_path_factory.mktemp("cache")), train_per_class=10, val_per_class=2)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("folder") / "data")


STAND_IN_WINDOW = 1.5  # seconds the stand-in compile clock advances per read: each compile window's length


@pytest.fixture
def stand_in_compile_clock(monkeypatch) -> float:
    """engine/compile_clock reads a stand-in that advances STAND_IN_WINDOW a read instead of the
    wall clock, so every compile window lasts exactly that long whatever this machine's speed (a
    count of windows, not a timing); returns the window length."""
    import itertools

    from automix_fast.engine import compile_clock

    reads = itertools.count()
    monkeypatch.setattr(compile_clock, "_now", lambda: STAND_IN_WINDOW * next(reads))
    return STAND_IN_WINDOW
