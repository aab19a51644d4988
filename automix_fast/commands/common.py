"""What eval, export and visualize share: a checkpoint read and checked, the trained policy
rebuilt from it without touching any data, and the evaluation data with its class check."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from automix_fast.config import build_config
from automix_fast.data import DataSpec, view_options
from automix_fast.data.evalset import build_eval_loader, resolve_eval_data
from automix_fast.engine.checkpoint import check_training_state, load_checkpoint, state_dict_mismatch
from automix_fast.engine.policy import create_policy_model, resolve_amp, resolve_device, resolve_loader, wrap_policy
from automix_fast.errors import CheckpointError, DataError

# Fields of the stored config that eval/visualize flags may replace.
EVAL_OVERRIDES = ("data_dir", "device", "kernel_backend", "loader", "workers", "validation_batch_size",
                  "skip_bad_images")


@dataclass
class Trained:
    """A policy with its weights, and what the checkpoint says about how it was trained."""

    path: Path
    state: dict
    cfg: object  # TrainConfig
    mixer: torch.nn.Module
    device: torch.device
    amp_dtype: torch.dtype | None
    channels_last: bool

    @property
    def classes(self) -> list[str]:
        return list(self.state.get("classes") or [])

    @property
    def img_size(self) -> int:
        return self.cfg.data.img_size or self.mixer.model.default_img_size


def read_training_checkpoint(path: str) -> dict:
    """The state of checkpoint `path`, checked to be a training checkpoint of this program."""
    state = load_checkpoint(path)
    check_training_state(path, state, with_config=True)
    return state


def load_trained(path: str, overrides: dict | None = None) -> Trained:
    """The policy of checkpoint `path` (config as stored, with `overrides`), weights loaded,
    in eval mode on its device. Builds no loader and reads no data."""
    state = read_training_checkpoint(path)
    stored = dict(state["config"])
    stored.update(overrides or {})
    trained_on = _training_folders(state)
    if "data_dir" not in (overrides or {}) and trained_on:
        found = [d for d in trained_on if os.path.isdir(d)]
        if not found:
            given = stored["data_dir"]
            where = given if os.path.isabs(given) else f"{given} (relative to the folder train ran in)"
            if trained_on[0] != given:
                where += f" or {trained_on[0]}"
            raise DataError(f"data directory not found: {where}, as stored by the run of {path}; pass --data-dir")
        stored["data_dir"] = found[0]
    if not any(same_folder(stored.get("data_dir"), d) for d in trained_on or [None]):
        stored["val_split"] = None  # another folder: evaluated as it is, not split as the training folder was
    stored.update(resume=None, experiment=None, torchcompile=False)
    cfg = build_config(stored)
    device = resolve_device(cfg.run.device)
    torch.manual_seed(cfg.run.seed)
    model = create_policy_model(cfg, int(state["num_classes"]))
    mixer = wrap_policy(cfg, model)
    try:
        mixer.load_state_dict(state["mixer"])
    except RuntimeError as e:
        raise CheckpointError(f"{path} does not match its model: {state_dict_mismatch(e)}") from None
    channels_last = cfg.run.channels_last if cfg.run.channels_last is not None else device.type == "cuda"
    mixer = mixer.to(device, memory_format=torch.channels_last) if channels_last else mixer.to(device)
    return Trained(Path(path), state, cfg, mixer.eval(), device, resolve_amp(cfg.run, device), channels_last)


def _training_folders(state: dict) -> list[str]:
    """Where a run's data folder is: the absolute path it had when the run trained (the
    checkpoint's data_root), then the config's data_dir as given to train (relative to the
    folder train ran in); empty for the embedded dataset."""
    return [d for d in (state.get("data_root"), state["config"].get("data_dir")) if d]


def same_folder(a: str | None, b: str | None) -> bool:
    """True when `a` and `b` name the same folder, however spelled (relative or absolute, a
    trailing slash, a symbolic link); None names the embedded dataset."""
    if a is None or b is None:
        return a is b
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist here: compare the spellings made absolute
        return os.path.normpath(os.path.abspath(a)) == os.path.normpath(os.path.abspath(b))


def eval_data(trained: Trained):
    """(loader, info, spec) of the evaluation split for `trained` (its stored data_dir unless
    overridden); DataError in one line when the class names differ from the checkpoint's."""
    cfg = trained.cfg
    info = resolve_eval_data(cfg.data.data_dir, cfg.data.dataset, cfg.data.skip_bad_images, cfg.data.val_split)
    check_classes(info, trained.classes, trained.path)
    spec = DataSpec(
        dataset=cfg.data.dataset, data_dir=cfg.data.data_dir, img_size=trained.img_size,
        batch_size=cfg.data.batch_size, eval_batch_size=cfg.data.validation_batch_size or 2 * cfg.data.batch_size,
        workers=cfg.data.workers, device=trained.device, channels_last=trained.channels_last,
        loader=resolve_loader(cfg.data.loader), aug=cfg.data.aug,
        seed=cfg.run.seed, skip_bad_images=cfg.data.skip_bad_images,
        dtype=trained.amp_dtype if (trained.amp_dtype is not None and trained.device.type == "cuda") else torch.float32,
        **view_options(cfg.data),
    )
    return build_eval_loader(spec, info), info, spec


def check_classes(info, trained: list[str], checkpoint) -> None:
    """DataError in one line when the class folders of `info` (a DatasetInfo) are not the ones
    `checkpoint` was trained on (`trained`; an old checkpoint without them is not checked)."""
    first = info.class_difference(trained) if trained else None
    if first is None:
        return
    only_data = [c for c in info.classes if c not in set(trained)]
    only_ckpt = [c for c in trained if c not in set(info.classes)]
    detail = first if not only_data and not only_ckpt else (
        f"{first}; only in the data: {only_data[:5] or 'none'}; only in the checkpoint: {only_ckpt[:5] or 'none'}")
    raise DataError(
        f"the class folders of {info.root} ({len(info.classes)}) differ from the {len(trained)} classes "
        f"{checkpoint} was trained on: {detail}"
    )
