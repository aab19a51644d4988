"""timm's `--initial-checkpoint PATH`: start a new run from a checkpoint's model weights.

Only the encoder q (the `model.*` weights of an automix-fast checkpoint) is taken: not the
optimizer, step, epoch, RNG or history, so the run starts at epoch 1 with a fresh schedule.
Copies of q start equal to the loaded weights, as they do at a fresh start: AutoMix's
momentum encoder k and the --model-ema copy. The Mix Block starts fresh. A checkpoint
trained without the mix head may start an AutoMix run (head_mix stays freshly initialized),
and the mix head of an AutoMix checkpoint is dropped for a baseline run. A different model
or class count is a one-line error. A plain state dict (`.pt` loadable with weights_only, or
`.safetensors`) is accepted too: with our key names, or an `automix-fast export` / torchvision
ResNet state dict (conv1, bn1, layer1..4, fc), whose names are mapped back to ours; so is a
timm-style checkpoint holding one (`{'state_dict': ...}`, `{'state_dict_ema': ...}`, ...) and
keys that DistributedDataParallel (`module.`) or torch.compile (`_orig_mod.`) prefixed, unwrapped
as timm's `load_checkpoint` does. An empty file, a file of something else, and weights that do not
fit the model are one line saying what the file holds.
"""
from __future__ import annotations

import argparse
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


# timm's training checkpoints hold the weights under one of these keys; the first one present is
# taken, as timm's load_checkpoint does (its EMA weights first).
TIMM_WEIGHT_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model")
# What wrappers put before every key: DistributedDataParallel, torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _describe(obj) -> str:
    """What a file holds, in a few words, for a line that refuses it."""
    if not isinstance(obj, dict):
        return f"it holds a {type(obj).__name__}"
    if not obj:
        return "it holds an empty dict"
    shown = ", ".join(repr(k) for k in list(obj)[:5]) + (", ..." if len(obj) > 5 else "")
    return f"it holds a dict of {len(obj)} entries: {shown}"


def _timm_key(weights: dict) -> str | None:
    """The key of a timm-style checkpoint that holds its weights (timm's `load_state_dict` with
    its EMA weights first), or None for a state dict itself."""
    if all(torch.is_tensor(v) for v in weights.values()):
        return None
    return next((k for k in TIMM_WEIGHT_KEYS if isinstance(weights.get(k), dict)), None)


def _without_wrappers(weights: dict) -> tuple[dict, list[str]]:
    """timm's `clean_state_dict`, for torch.compile's prefix too: the keys without the prefixes
    that wrappers put before them, and those prefixes."""
    clean = {}
    for name in weights:
        key = name
        while isinstance(key, str) and key.startswith(WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        clean[name] = key
    prefixes = sorted({name[: len(name) - len(key)] for name, key in clean.items() if key != name})
    return {clean[k]: v for k, v in weights.items()}, prefixes


def plain_weights(path: str, num_classes: int, model_name: str) -> tuple[dict[str, torch.Tensor], str]:
    """A plain state dict (`torch.save(model.state_dict())`, or the same as .safetensors) with our
    key names or export/torchvision ones (`fc.*` marks those), or a timm-style checkpoint holding
    one (`TIMM_WEIGHT_KEYS`, `WRAPPER_PREFIXES`); the class count is read from the head. Also says
    where in the file the weights were found ("" for a plain state dict)."""
    try:
        with warnings.catch_warnings(), torch.serialization.safe_globals([argparse.Namespace]):
            warnings.simplefilter("ignore")  # e.g. torch's "Detected pickle protocol 4" on a foreign pickle
            weights = read_weights(path)  # timm's checkpoints also pickle its argument Namespace
    except Exception as e:  # any unreadable file: one line naming it
        raise CheckpointError(f"--initial-checkpoint {path}: neither an automix-fast checkpoint nor plain weights "
                              f"({_load_failure(e)})") from None
    refuse = f"--initial-checkpoint {path}: neither an automix-fast checkpoint nor a state dict of tensors"
    if not isinstance(weights, dict) or not weights:
        raise CheckpointError(f"{refuse} ({_describe(weights)})")
    key = _timm_key(weights)
    if key is None and not all(torch.is_tensor(v) for v in weights.values()):
        raise CheckpointError(f"{refuse} ({_describe(weights)})")
    if key is not None:
        inner = weights[key]
        other = next((k for k, v in inner.items() if not torch.is_tensor(v)), None)
        if not inner or other is not None:
            what = "is empty" if not inner else f"holds {other!r}, a {type(inner[other]).__name__}"
            raise CheckpointError(f"{refuse} (its '{key}' {what})")
        weights = inner
    weights, prefixes = _without_wrappers(weights)
    done = ([f"its '{key}'"] if key else []) + (
        [f"{' and '.join(repr(p) for p in prefixes)} removed from its keys"] if prefixes else [])
    weights = {k[len("model."):] if k.startswith("model.") else k: v for k, v in weights.items()}
    if "fc.weight" in weights:  # an export (or torchvision's own weights): back to our key names
        tv = torchvision_name(model_name) is not None
        weights = {from_export_keys(k, tv): v for k, v in weights.items()}
    head = weights.get("head_one.weight")
    if head is not None and head.shape[0] != num_classes:
        raise ConfigError(f"--initial-checkpoint {path} was trained for {head.shape[0]} classes, but the data has {num_classes}")
    return weights, ", ".join(done)


def initial_weights(path: str, model_name: str, num_classes: int) -> tuple[dict[str, torch.Tensor], str]:
    """The `model.*` weights of checkpoint `path`, checked against this run's model and classes,
    and where in the file they were found ("" for our checkpoints and plain state dicts)."""
    try:
        state = load_checkpoint(path)  # an empty file: its one line, re-raised below
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
    return {k[len("model."):]: v for k, v in state["mixer"].items() if k.startswith("model.")}, ""


@torch.no_grad()
def load_initial_checkpoint(mixer, path: str, model_name: str, num_classes: int) -> None:
    """Load the weights into mixer.model and restart its copies (k, model EMA) from them; returns
    where in the file the weights were found ("" for our checkpoints and plain state dicts)."""
    weights, source = initial_weights(path, model_name, num_classes)
    model = mixer.model
    own = model.state_dict()
    missing = [k for k in own if k not in weights and not k.startswith(OPTIONAL_PREFIX)]
    wrong = [k for k in own if k in weights and weights[k].shape != own[k].shape]
    if missing or wrong:
        what = f"lacks {missing[0]}" if missing else f"has {wrong[0]} of shape {tuple(weights[wrong[0]].shape)}"
        found = f"{source}: " if source else ""
        raise CheckpointError(f"--initial-checkpoint {path} does not match {model_name}: it {what} ({found}"
                              f"{len(weights)} tensors, the first {next(iter(weights))!r})")
    model.load_state_dict({k: v for k, v in weights.items() if k in own}, strict=False)
    for copy in (mixer.momentum_encoder, mixer.model_ema):
        if copy is not None:
            copy.load_state_dict(model.state_dict())
    return source
