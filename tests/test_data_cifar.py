"""CIFAR batches are read with a restricted unpickler: a crafted batch in a downloaded folder
cannot run code, and the real format (Python-2 style protocol-2 pickles of numpy arrays, read
with encoding="bytes") still loads."""
from __future__ import annotations

import os
import pickle

import numpy as np
import pytest

from automix_fast.data import DataSpec, resolve_dataset
from automix_fast.data.cifar import load_cifar
from automix_fast.errors import DataError


def _official_style_batch(n: int, seed: int, label_key: bytes = b"labels") -> bytes:
    """A batch built the way the official ones are: a dict with bytes keys, (N, 3072) uint8 CHW
    rows, a list of int labels, bytes filenames; pickled with protocol 2 and the numpy module
    path numpy 1.x wrote (numpy.core.multiarray), as the published files name it."""
    rng = np.random.default_rng(seed)
    batch = {
        b"batch_label": b"training batch 1 of 5",
        label_key: [int(v) for v in rng.integers(0, 10, n)],
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        b"filenames": [f"img_{i}.png".encode() for i in range(n)],
    }
    blob = pickle.dumps(batch, protocol=2)
    return blob.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")


def _cifar10_dir(root, train_blob: bytes | None = None) -> str:
    d = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(d)
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        with open(os.path.join(d, name), "wb") as f:
            f.write(train_blob if (train_blob is not None and name == "data_batch_3") else _official_style_batch(4, i))
    with open(os.path.join(d, "batches.meta"), "wb") as f:
        f.write(pickle.dumps({b"label_names": [f"c{i}".encode() for i in range(10)], b"num_vis": 3072}, protocol=2))
    return d


def test_official_format_still_loads(tmp_path):
    d = _cifar10_dir(tmp_path)
    info = resolve_dataset(DataSpec(data_dir=str(tmp_path)))
    x, y = info.train_arrays
    assert info.kind == "cifar10" and x.shape == (20, 32, 32, 3) and x.dtype == np.uint8
    expected = pickle.loads(open(os.path.join(d, "data_batch_2"), "rb").read(), encoding="bytes")
    assert np.array_equal(x[4:8], expected[b"data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    assert y[4:8].tolist() == expected[b"labels"]
    assert info.classes[:2] == ["c0", "c1"]


def test_python3_str_keys_and_arrays_load(tmp_path):
    d = _cifar10_dir(tmp_path)
    rng = np.random.default_rng(9)
    with open(os.path.join(d, "test_batch"), "wb") as f:  # re-saved by Python 3: str keys, numpy labels
        pickle.dump({"data": rng.integers(0, 256, (3, 3072), dtype=np.uint8), "labels": np.arange(3)}, f, protocol=2)
    info = load_cifar(str(tmp_path), "cifar10")
    assert info.val_arrays[1].tolist() == [0, 1, 2]


class _RunsCode:
    """Unpickling this with pickle.load calls os.makedirs: the folder would appear."""

    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (os.makedirs, (self.target,))


class _NamesAnotherGlobal:
    def __reduce__(self):
        return (np.ones, ((2, 2),))  # harmless, but not something a batch holds


@pytest.mark.parametrize("kind,named", [("code", "makedirs"), ("global", "numpy.ones")])
def test_a_pickle_naming_other_code_is_refused_and_nothing_runs(tmp_path, kind, named):
    target = tmp_path / "code_ran"
    payload = _RunsCode(str(target)) if kind == "code" else _NamesAnotherGlobal()
    blob = pickle.dumps({b"data": payload, b"labels": [0]}, protocol=2)
    _cifar10_dir(tmp_path, train_blob=blob)
    with pytest.raises(DataError) as e:
        load_cifar(str(tmp_path), "cifar10")
    msg = str(e.value)
    assert "\n" not in msg and "data_batch_3" in msg and named in msg and "refused" in msg
    assert not target.exists()  # the refused global was never called


def test_codecs_encode_only_rebuilds_latin1_bytes(tmp_path):
    import _codecs

    class _Rot13:
        def __reduce__(self):
            return (_codecs.encode, ("abc", "rot13"))

    _cifar10_dir(tmp_path, train_blob=pickle.dumps({b"data": _Rot13()}, protocol=2))
    with pytest.raises(DataError, match="data_batch_3"):
        load_cifar(str(tmp_path), "cifar10")


def test_the_code_pickle_really_runs_code_under_plain_pickle(tmp_path):
    """The refusal test is only meaningful if plain pickle.load would have run the payload."""
    target = tmp_path / "code_ran"
    pickle.loads(pickle.dumps({b"data": _RunsCode(str(target))}, protocol=2))
    assert target.is_dir()


def _write_batch(path, images_nhwc, labels, label_key):
    # The real batches are Python-2 pickles: bytes keys, data as (N, 3072) CHW rows.
    data = images_nhwc.transpose(0, 3, 1, 2).reshape(len(images_nhwc), -1)
    with open(path, "wb") as f:
        pickle.dump({b"data": data, label_key.encode(): list(labels), b"batch_label": b"x"}, f, protocol=2)


def make_cifar10(root, per_batch=3):
    d = root / "cifar-10-batches-py"
    os.makedirs(d)
    rng = np.random.default_rng(1)
    all_x, all_y = [], []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        x = rng.integers(0, 256, (per_batch, 32, 32, 3), dtype=np.uint8)
        y = rng.integers(0, 10, per_batch)
        _write_batch(d / name, x, y, "labels")
        all_x.append(x), all_y.append(y)
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, f, protocol=2)
    return d, all_x, all_y


def test_cifar10_batches_load(tmp_path):
    d, xs, ys = make_cifar10(tmp_path)
    for data_dir in (tmp_path, d):  # the parent or the batches folder itself
        info = resolve_dataset(DataSpec(data_dir=str(data_dir)))
        assert info.kind == "cifar10" and info.classes == [f"c{i}" for i in range(10)]
        x, y = info.train_arrays
        assert x.shape == (15, 32, 32, 3) and x.dtype == np.uint8 and y.dtype == np.int64
        np.testing.assert_array_equal(x, np.concatenate(xs[:5]))
        np.testing.assert_array_equal(y, np.concatenate(ys[:5]))
        np.testing.assert_array_equal(info.val_arrays[0], xs[5])


def test_cifar100_batches_load(tmp_path):
    d = tmp_path / "cifar-100-python"
    os.makedirs(d)
    x = np.random.default_rng(2).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    _write_batch(d / "train", x, [0, 99, 5, 7], "fine_labels")
    _write_batch(d / "test", x[:2], [3, 4], "fine_labels")
    info = resolve_dataset(DataSpec(data_dir=str(tmp_path)))
    assert info.kind == "cifar100" and info.num_classes == 100 and info.num_train == 4 and info.num_val == 2
    assert info.train_arrays[1].tolist() == [0, 99, 5, 7]


def test_cifar_missing_batch_named(tmp_path):
    d, _, _ = make_cifar10(tmp_path)
    os.remove(d / "data_batch_3")
    with pytest.raises(DataError, match="data_batch_3"):
        resolve_dataset(DataSpec(data_dir=str(tmp_path)))
