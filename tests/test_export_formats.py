"""`automix-fast export --output FILE.pt2 | FILE.onnx`: the whole model as a program that runs
without automix-fast installed, with the same logits as the trained model.

The .pt2 is loaded in a fresh Python process in which `import automix_fast` fails, from a
folder outside the repository; only torch is used there. ONNX is tested where onnx and
onnxscript are installed (and run where onnxruntime is), skipped otherwise.
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap

import pytest
import torch

from automix_fast.cli import main
from automix_fast.errors import UserError
from faultkit import ENV, random_checkpoint

CLASSES = ["cat", "dog", "emu"]
# Same ops on the same CPU; the exported graph may fuse or reorder BatchNorm arithmetic.
TOL = dict(rtol=1e-5, atol=1e-5)

# Runs in a process where automix_fast cannot be imported: torch alone loads and runs the file.
LOAD_WITHOUT_PACKAGE = textwrap.dedent("""
    import sys
    sys.modules["automix_fast"] = None  # any import of it now raises ImportError
    try:
        import automix_fast
    except ImportError:
        pass
    else:
        raise SystemExit("automix_fast is importable")
    import torch
    program, x_path, out_path = sys.argv[1:]
    net = torch.export.load(program).module()
    xs = torch.load(x_path)
    with torch.no_grad():
        torch.save([net(x) for x in xs], out_path)
    assert not any(m.startswith("automix_fast") for m in sys.modules if sys.modules[m] is not None)
""")


def make_checkpoint(folder, arch: str):
    """A vanilla `arch` checkpoint with random weights and BN statistics; (path, model in eval mode)."""
    path = folder / f"{arch}.pt"
    return path, random_checkpoint(path, arch, "vanilla", CLASSES, seed=1).model


@pytest.mark.parametrize("arch", ["tinynet", "resnet20_cifar"])
def test_pt2_runs_with_torch_alone_and_gives_the_same_logits(arch, tmp_path, capsys):
    ckpt, model = make_checkpoint(tmp_path, arch)
    out = tmp_path / "out" / "model.pt2"
    assert main(["export", "--checkpoint", str(ckpt), "--output", str(out)]) == 0
    assert "torch.export program, input (batch, 3, 32, 32)" in capsys.readouterr().out
    meta = json.loads((tmp_path / "out" / "model.pt2.json").read_text())
    assert (meta["file_format"], meta["model"], meta["classes"], meta["image_size"]) == ("torch.export", arch, CLASSES, 32)

    torch.manual_seed(2)
    xs = [torch.randn(n, 3, 32, 32) for n in (1, 2, 5)]  # the batch dimension is dynamic
    torch.save(xs, tmp_path / "x.pt")
    away = tmp_path / "elsewhere"  # not the repository: no ./automix_fast to import
    away.mkdir()
    env = {k: v for k, v in ENV.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_PACKAGE, str(out), str(tmp_path / "x.pt"),
                           str(tmp_path / "logits.pt")], cwd=away, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    logits = torch.load(tmp_path / "logits.pt")
    with torch.no_grad():
        for x, got in zip(xs, logits):
            expected = model(x, head="one")
            assert got.shape == (x.shape[0], len(CLASSES))
            torch.testing.assert_close(got, expected, **TOL)


def test_onnx_without_onnx_installed_is_one_line(tmp_path, capsys):
    if importlib.util.find_spec("onnx") and importlib.util.find_spec("onnxscript"):
        pytest.skip("onnx and onnxscript are installed")
    ckpt, _ = make_checkpoint(tmp_path, "tinynet")
    assert main(["export", "--checkpoint", str(ckpt), "--output", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: --output m.onnx needs ")
    assert "pip install" in err and "FILE.pt2" in err
    assert not list(tmp_path.glob("m.*"))


def test_onnx_export_gives_the_same_logits(tmp_path, capsys):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    ckpt, model = make_checkpoint(tmp_path, "tinynet")
    out = tmp_path / "m.onnx"
    assert main(["export", "--checkpoint", str(ckpt), "--output", str(out)]) == 0
    assert json.loads((tmp_path / "m.onnx.json").read_text())["file_format"] == "onnx"
    onnx.checker.check_model(onnx.load(str(out)))
    ort = pytest.importorskip("onnxruntime")
    onnx_model = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for n in (1, 3):
        x = torch.randn(n, 3, 32, 32)
        (got,) = onnx_model.run(None, {onnx_model.get_inputs()[0].name: x.numpy()})
        with torch.no_grad():
            torch.testing.assert_close(torch.from_numpy(got), model(x, head="one"), rtol=1e-4, atol=1e-4)


def test_exports_sharing_a_stem_keep_a_json_each(tmp_path, capsys):
    """t1.pt2, t1.safetensors and t1.pt side by side: each has its own JSON, saying its own
    format, and load_export reads the one of the file it is given."""
    from automix_fast.export import load_export

    ckpt, model = make_checkpoint(tmp_path, "tinynet")
    formats = {"t1.pt2": "torch.export", "t1.safetensors": "safetensors", "t1.pt": "torch.save"}
    for name in formats:
        assert main(["export", "--checkpoint", str(ckpt), "--output", str(tmp_path / name)]) == 0
        assert f"{tmp_path / name}.json: classes" in capsys.readouterr().out
    for name, fmt in formats.items():
        meta = json.loads((tmp_path / f"{name}.json").read_text())
        assert meta["file_format"] == fmt and meta["key_names"] == (None if fmt == "torch.export" else "automix-fast")
    assert not (tmp_path / "t1.json").exists()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(load_export(tmp_path / "t1.pt")(x), model(x, head="one"))
    (tmp_path / "t1.pt.json").unlink()
    with pytest.raises(UserError, match=r"t1\.pt\.json not found"):
        load_export(tmp_path / "t1.pt")
