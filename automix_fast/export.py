"""One encoder (q or k) and one classifier head of a training checkpoint, for use elsewhere.

    FILE.safetensors or FILE.pt     a flat {name: tensor} state dict (torch.load(weights_only=True))
    FILE.pt2                        the whole model as a torch.export ExportedProgram: loads with
                                    torch.export.load(FILE).module() and nothing but torch
    FILE.onnx                       the whole model as ONNX (writing it needs onnx and onnxscript)
    FILE.<suffix>.json              beside each of them: model, classes, image size,
                                    normalisation, key naming (one per file, so exports that
                                    share a stem, t1.pt2 and t1.safetensors, keep their own)

The programs (.pt2, .onnx) take a (batch, 3, image_size, image_size) float32 input, any batch
size, and return the logits. In the weight files of the ResNet family (resnet18/34/50/101,
resnext50_32x4d and their `_cifar` variants) the keys are torchvision's: conv1, bn1,
layer1.0.conv1, ..., layer4.1.bn2, fc; the ImageNet-stem models load straight into
`torchvision.models.<name>(num_classes=C)`. Other models keep our names (stem.*, stages.*) with
the head as fc.*. `load_export` rebuilds our model from a weight file.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from automix_fast.errors import ConfigError, UserError
from automix_fast.atomic import write_bytes, write_json
from automix_fast.models import create_model
from automix_fast.models.resnet import RESNETS
from automix_fast.rundir import check_writable

EXPORT_FORMAT = "automix-fast-export/1"
FILE_FORMATS = {".safetensors": "safetensors", ".pt": "torch.save", ".pth": "torch.save",
                ".pt2": "torch.export", ".onnx": "onnx"}
SUFFIXES = tuple(FILE_FORMATS)
PROGRAM_FORMATS = ("torch.export", "onnx")  # the whole model, runnable without automix-fast

# Our Classifier's key prefixes -> torchvision's, for the ResNet family (same module order and
# shapes: see models/resnet.py); other models only rename their head. The reverse maps an
# export back onto our model.
_TO_TORCHVISION = ((r"^stem\.0\.", "conv1."), (r"^stem\.1\.", "bn1."), (r"^head_one\.", "fc."),
                   (r"^stages\.(\d+)\.", lambda m: f"layer{int(m.group(1)) + 1}."))
_FROM_TORCHVISION = ((r"^conv1\.", "stem.0."), (r"^bn1\.", "stem.1."), (r"^fc\.", "head_one."),
                     (r"^layer(\d+)\.", lambda m: f"stages.{int(m.group(1)) - 1}."))
_TO_PLAIN = ((r"^head_one\.", "fc."),)
_FROM_PLAIN = ((r"^fc\.", "head_one."),)


def torchvision_name(arch: str) -> str | None:
    """'resnet50' for resnet50 and resnet50_cifar; None for models outside the ResNet family."""
    base = arch[: -len("_cifar")] if arch.endswith("_cifar") else arch
    return base if base in RESNETS else None


def _rename(key: str, rules) -> str:
    for pattern, new in rules:
        key = re.sub(pattern, new, key)
    return key


def to_export_keys(key: str, torchvision: bool) -> str:
    return _rename(key, _TO_TORCHVISION if torchvision else _TO_PLAIN)


def from_export_keys(key: str, torchvision: bool) -> str:
    return _rename(key, _FROM_TORCHVISION if torchvision else _FROM_PLAIN)


def encoder_weights(mixer_state: dict, encoder: str, head: str) -> dict[str, torch.Tensor]:
    """The Classifier state of encoder 'q' (online) or 'k' (momentum) with `head` ("one" or
    "mix") as its only head, under our key names."""
    prefix = {"q": "model.", "k": "momentum_encoder."}[encoder]
    own = {k[len(prefix):]: v for k, v in mixer_state.items() if k.startswith(prefix)}
    if not own:
        raise UserError(f"the checkpoint has no encoder {encoder!r} (only AutoMix trains a momentum encoder k; use --head q)")
    if not any(k.startswith(f"head_{head}.") for k in own):
        raise UserError(f"the checkpoint's encoder {encoder!r} has no '{head}' head (only AutoMix trains a 'mix' head)")
    out = {k: v for k, v in own.items() if not k.startswith(("head_one.", "head_mix."))}
    out.update({"head_one." + k.split(".", 1)[1]: v for k, v in own.items() if k.startswith(f"head_{head}.")})
    return out


def export_state(mixer_state: dict, arch: str, encoder: str = "q", head: str = "one") -> dict[str, torch.Tensor]:
    tv = torchvision_name(arch) is not None
    weights = encoder_weights(mixer_state, encoder, head)
    # Own, contiguous CPU storage per tensor: safetensors refuses shared or strided tensors.
    return {to_export_keys(k, tv): v.detach().cpu().contiguous().clone() for k, v in weights.items()}


def metadata_path(output: str | Path) -> Path:
    """The JSON beside export `output`: its whole name plus .json (model.pt2 -> model.pt2.json)."""
    output = Path(output)
    return output.with_name(output.name + ".json")


def check_output(output: str | Path) -> Path:
    """Before any work: `output` has a known suffix, what its format needs is installed, and it
    and its JSON can be written; one-line UserError otherwise."""
    from importlib.util import find_spec

    output = Path(output)
    if output.suffix not in SUFFIXES:
        raise ConfigError(f"--output must end in {', '.join(SUFFIXES)}, got {output.name}")
    if output.suffix == ".onnx":
        missing = [m for m in ("onnx", "onnxscript") if find_spec(m) is None]
        if missing:
            raise UserError(f"--output {output.name} needs {' and '.join(missing)} "
                            f"(pip install {' '.join(missing)}), or write FILE.pt2, which needs only torch")
    check_writable(output, "export")
    check_writable(metadata_path(output), "export metadata")
    return output


def file_format(output: str | Path) -> str:
    return FILE_FORMATS[Path(output).suffix]


def serialize(output: str | Path, state: dict[str, torch.Tensor], meta: dict, model=None) -> bytes:
    """The bytes of `output`'s format: the weights `state` (.safetensors, .pt, .pth), or the
    whole `model` (eval mode, CPU) as a program run on a (batch, 3, image_size, image_size)
    input with a dynamic batch (.pt2: torch.export, .onnx: ONNX)."""
    import io

    fmt = file_format(output)
    if fmt == "safetensors":
        from safetensors.torch import save

        return save(state, metadata={"format": EXPORT_FORMAT, "model": meta["model"]})
    buf = io.BytesIO()
    if fmt == "torch.save":
        torch.save(state, buf)
        return buf.getvalue()
    size = int(meta["image_size"])
    example = (torch.randn(2, 3, size, size),)
    batch = ({0: torch.export.Dim("batch")},)
    model = model.eval()
    if fmt == "torch.export":
        with torch.no_grad():
            torch.export.save(torch.export.export(model, example, dynamic_shapes=batch), buf)
        return buf.getvalue()
    program = torch.onnx.export(model, example, input_names=["x"], output_names=["logits"],
                                dynamic_shapes=batch, dynamo=True)
    return program.model_proto.SerializeToString()


def write_export(state: dict[str, torch.Tensor], meta: dict, output: str | Path, model=None) -> tuple[Path, Path]:
    """Write `output` in the format of its suffix (see `serialize`) and its JSON beside it
    (`metadata_path`), each atomically; returns both paths."""
    output = check_output(output)
    meta = {**meta, "file_format": file_format(output)}
    if meta["file_format"] in PROGRAM_FORMATS:
        meta["key_names"] = None  # a whole program, not a state dict to load into a model
    write_bytes(output, serialize(output, state, meta, model), "export")
    return output, write_json(metadata_path(output), meta, "export metadata")


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if FILE_FORMATS.get(path.suffix) in PROGRAM_FORMATS:
        raise UserError(f"{path} is a whole program, not weights: run it with torch.export.load(path).module()"
                        if path.suffix == ".pt2" else f"{path} is an ONNX program, not weights")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def load_export(path: str | Path):
    """Our Classifier (eval mode, CPU) holding an export's weights, built from its JSON."""
    try:
        meta = json.loads(metadata_path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"{metadata_path(path)} not found: load_export reads the JSON automix-fast export "
                        f"writes beside {Path(path).name}") from None
    model = create_model(meta["model"], num_classes=meta["num_classes"])
    tv = meta["key_names"] == "torchvision"
    model.load_state_dict({from_export_keys(k, tv): v for k, v in read_weights(path).items()})
    return model.eval()
