"""timm's `--initial-checkpoint PATH`: start a new run from a checkpoint's model weights.

Only the encoder q (the `model.*` weights of an automix-fast checkpoint) is taken: not the
optimizer, step, epoch, RNG or history, so the run starts at epoch 1 with a fresh schedule.
Copies of q start equal to the loaded weights, as they do at a fresh start: AutoMix's
momentum encoder k and the --model-ema copy. The Mix Block starts fresh. A checkpoint
trained without the mix head may start an AutoMix run (head_mix stays freshly initialized),
and the mix head of an AutoMix checkpoint is dropped for a baseline run. A different model
or class count is a one-line error. A plain state dict (`.pt` loadable with weights_only, or
`.safetensors`) is accepted too: with our key names, or an `automix-fast export` / torchvision
ResNet state dict (conv1, bn1, layer1..4, fc), whose names are mapped back to ours.
"""
from __future__ import annotations

import re
import warnings

import torch

from automix_fast.engine.checkpoint import check_training_state, load_checkpoint
from automix_fast.errors import CheckpointError, ConfigError
from automix_fast.export import from_export_keys, read_weights, torchvision_name

OPTIONAL_PREFIX = "head_mix."  # the only weights allowed to be missing on either side


def _load_failure(error: Exception) -> str:
    """Why a file did not load, in one line. torch.load(weights_only=True)'s refusal is mostly
    advice (load it with weights_only=False, which this command cannot do); its reason is the
    WeightsUnpickler's line: a global it will not unpickle, or an opcode of no torch.save file."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip()
    reason = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    if reason:
        found = re.match(r"Unsupported global: GLOBAL (\S+)", reason.group(1))
        if found:
            return f"it pickles {found.group(1)}, not only tensors; torch.load(weights_only=True) refuses it"
        if reason.group(1).startswith("Unsupported operand"):
            return "not a torch.save file"
        return reason.group(1).strip()
    return text.splitlines()[0] if text else type(error).__name__


def plain_weights(path: str, num_classes: int, model_name: str) -> dict[str, torch.Tensor]:
    """A plain state dict (`torch.save(model.state_dict())`, or the same as .safetensors) with our
    key names or export/torchvision ones (`fc.*` marks those); the class count is read from the head."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. torch's "Detected pickle protocol 4" on a foreign pickle
            weights = read_weights(path)
    except Exception as e:  # any unreadable file: one line naming it
        raise CheckpointError(f"--initial-checkpoint {path}: neither an automix-fast checkpoint nor plain weights "
                              f"({_load_failure(e)})") from None
    if not isinstance(weights, dict) or not all(torch.is_tensor(v) for v in weights.values()):
        raise CheckpointError(f"--initial-checkpoint {path}: neither an automix-fast checkpoint nor a state dict of tensors")
    weights = {k[len("model."):] if k.startswith("model.") else k: v for k, v in weights.items()}
    if "fc.weight" in weights:  # an export (or torchvision's own weights): back to our key names
        tv = torchvision_name(model_name) is not None
        weights = {from_export_keys(k, tv): v for k, v in weights.items()}
    head = weights.get("head_one.weight")
    if head is not None and head.shape[0] != num_classes:
        raise ConfigError(f"--initial-checkpoint {path} was trained for {head.shape[0]} classes, but the data has {num_classes}")
    return weights


def initial_weights(path: str, model_name: str, num_classes: int) -> dict[str, torch.Tensor]:
    """The `model.*` weights of checkpoint `path`, checked against this run's model and classes."""
    try:
        state = load_checkpoint(path)
    except CheckpointError as e:
        if "unknown header" not in str(e):
            raise
        return plain_weights(path, num_classes, model_name)
    check_training_state(path, state, "--initial-checkpoint")
    if state.get("model_name") != model_name:
        raise ConfigError(f"--initial-checkpoint {path} holds model '{state.get('model_name')}', "
                          f"but this run trains '{model_name}'")
    if state.get("num_classes") != num_classes:
        raise ConfigError(f"--initial-checkpoint {path} was trained for {state.get('num_classes')} classes, "
                          f"but the data has {num_classes}")
    return {k[len("model."):]: v for k, v in state["mixer"].items() if k.startswith("model.")}


@torch.no_grad()
def load_initial_checkpoint(mixer, path: str, model_name: str, num_classes: int) -> None:
    """Load the weights into mixer.model and restart its copies (k, model EMA) from them."""
    weights = initial_weights(path, model_name, num_classes)
    model = mixer.model
    own = model.state_dict()
    missing = [k for k in own if k not in weights and not k.startswith(OPTIONAL_PREFIX)]
    wrong = [k for k in own if k in weights and weights[k].shape != own[k].shape]
    if missing or wrong:
        what = f"lacks {missing[0]}" if missing else f"has {wrong[0]} of shape {tuple(weights[wrong[0]].shape)}"
        raise CheckpointError(f"--initial-checkpoint {path} does not match {model_name}: it {what}")
    model.load_state_dict({k: v for k, v in weights.items() if k in own}, strict=False)
    for copy in (mixer.momentum_encoder, mixer.model_ema):
        if copy is not None:
            copy.load_state_dict(model.state_dict())
