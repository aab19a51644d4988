"""Plain weights out of a training checkpoint: one encoder (q or k) and one classifier head.

    FILE.safetensors or FILE.pt     a flat {name: tensor} state dict (torch.load(weights_only=True))
    FILE.json                       model, classes, image size, normalisation, key naming

For the ResNet family (resnet18/34/50/101, resnext50_32x4d and their `_cifar` variants) the keys
are torchvision's: conv1, bn1, layer1.0.conv1, ..., layer4.1.bn2, fc; the ImageNet-stem models
load straight into `torchvision.models.<name>(num_classes=C)`. Other models keep our names
(stem.*, stages.*) with the head as fc.*. `load_export` rebuilds our model from an export.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from automix_fast.errors import ConfigError, UserError
from automix_fast.rundir import write_json

EXPORT_FORMAT = "automix-fast-export/1"
SUFFIXES = (".safetensors", ".pt", ".pth")

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
    from automix_fast.models.resnet import RESNETS

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
    return Path(output).with_suffix(".json")


def write_export(state: dict[str, torch.Tensor], meta: dict, output: str | Path) -> tuple[Path, Path]:
    """Write the weights (format from the suffix) and FILE.json; returns both paths."""
    output = Path(output)
    if output.suffix not in SUFFIXES:
        raise ConfigError(f"--output must end in {', '.join(SUFFIXES)}, got {output.name}")
    from automix_fast.rundir import write_failure

    tmp = output.with_name(f".{output.name}.tmp")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        if output.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(state, str(tmp), metadata={"format": EXPORT_FORMAT, "model": meta["model"]})
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # safetensors creates 0600; give it a normal file's mode
        else:
            torch.save(state, tmp)
        tmp.replace(output)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise (write_failure(output, e, "export") or e) from None
    return output, write_json(metadata_path(output), meta, "export metadata")


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def load_export(path: str | Path):
    """Our Classifier (eval mode, CPU) holding an export's weights, built from its JSON."""
    from automix_fast.models import create_model

    meta = json.loads(metadata_path(path).read_text())
    model = create_model(meta["model"], num_classes=meta["num_classes"])
    tv = meta["key_names"] == "torchvision"
    model.load_state_dict({from_export_keys(k, tv): v for k, v in read_weights(path).items()})
    return model.eval()
