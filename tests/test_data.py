"""data/__init__.py: which dataset a folder is, the errors for missing or unrecognised data, and the
lazy DALI import."""
from __future__ import annotations

import sys

import pytest

from automix_fast.data import DataSpec, build_loaders, resolve_dataset
from automix_fast.errors import DataError
from datakit import folder_spec, make_folder


def test_auto_detects_folder(tmp_path):
    info = resolve_dataset(folder_spec(make_folder(tmp_path)))
    assert info.kind == "folder" and info.classes == ["cat", "dog"] and info.num_train == 6 and info.num_val == 6


@pytest.mark.parametrize("dataset", ["auto", "folder"])
def test_missing_data_dir(tmp_path, dataset):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match="not found.*nowhere"):
        resolve_dataset(DataSpec(dataset=dataset, data_dir=str(missing)))


def test_no_val_folder(tmp_path):
    make_folder(tmp_path, splits=("train",))
    with pytest.raises(DataError, match="val/"):
        resolve_dataset(DataSpec(dataset="folder", data_dir=str(tmp_path)))


def test_unrecognised_dir(tmp_path):
    with pytest.raises(DataError, match="cannot tell"):
        resolve_dataset(folder_spec(tmp_path))


def test_dali_dispatch_is_lazy(tmp_path, monkeypatch):
    import subprocess

    import automix_fast.data

    calls = []
    monkeypatch.setattr(automix_fast.data, "build_dali_loaders", lambda spec, info: calls.append((spec, info)) or ("T", "V"))
    train, val, info = build_loaders(folder_spec(make_folder(tmp_path), loader="dali"))
    assert (train, val) == ("T", "V") and calls[0][1] is info
    # DALI itself is imported only when a DALI loader is built, not with the data package.
    code = "import sys, automix_fast.data.evalset; print('nvidia.dali' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"
