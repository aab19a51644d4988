"""What a loader is asked for (`DataSpec`, checked by `validate_spec`) and what resolving a
dataset finds (`DatasetInfo`). Re-exported by `automix_fast.data`."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..config.sections import AUGS, CROP_PADDING_MODES, DATASETS, INTERPOLATIONS
from ..errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class DataSpec:
    """Everything a loader needs to know; built by the CLI from the resolved config."""

    dataset: str = "auto"  # auto | embedded | folder | cifar10 | cifar100
    data_dir: str | None = None
    img_size: int = 32
    batch_size: int = 64  # per rank
    eval_batch_size: int = 256
    workers: int = 2
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    channels_last: bool = False
    dtype: torch.dtype = torch.float32  # dtype of the emitted images
    loader: str = "torch"  # torch | dali
    aug: str = "auto"  # auto | cifar | imagenet
    crop_padding_mode: str = "zeros"  # zeros | reflect: the border of the cifar aug's random crop
    crop_pct: float | None = None  # eval centre-crop fraction; None: transforms.eval_resize_for's default
    train_interpolation: str = "bilinear"  # resampling filter of the training images: bilinear | bicubic
    interpolation: str = "bilinear"  # resampling filter of the eval images
    rank: int = 0
    world_size: int = 1
    seed: int = 0
    skip_bad_images: bool = False
    train_subset: float | None = None  # a class-balanced fraction of the training set (data/subset.py)
    train_subset_seed: int = 0
    val_split: float | None = None  # hold out this class-balanced part of a folder without val/ (data/subset.py)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def filter_for(self, train: bool) -> str:
        """The resampling filter of the training images (train_interpolation) or the eval ones (interpolation)."""
        return self.train_interpolation if train else self.interpolation


@dataclass
class DatasetInfo:
    """A resolved dataset: file lists for folders, arrays for in-memory data."""

    kind: str  # folder | cifar10 | cifar100 | embedded
    root: str
    classes: list[str]
    train_samples: list[tuple[str, int]] | None = None
    val_samples: list[tuple[str, int]] | None = None
    train_arrays: tuple | None = None  # (uint8 NHWC ndarray, int64 ndarray)
    val_arrays: tuple | None = None
    bad_files: object = None  # bad_files.BadFiles: files that failed to decode mid-run (build_loaders sets it)
    screened_out: list = field(default_factory=list)  # (path, problem) dropped by --skip-bad-images before training

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def class_difference(self, trained: list[str]) -> str | None:
        """How this dataset's class list differs from `trained` (a checkpoint's), naming the first
        label that would change meaning; None when they are the same names in the same order."""
        found = list(self.classes)
        if found == list(trained):
            return None
        i = next((i for i, (a, b) in enumerate(zip(found, trained)) if a != b), min(len(found), len(trained)))
        here = repr(found[i]) if i < len(found) else "missing"
        there = repr(trained[i]) if i < len(trained) else "missing"
        order = " (the same names in another order)" if sorted(found) == sorted(trained) else ""
        return f"label {i} is {here} in the data and {there} in the checkpoint{order}"

    @property
    def num_train(self) -> int:
        return len(self.train_samples) if self.train_samples is not None else len(self.train_arrays[1])

    @property
    def num_val(self) -> int:
        return len(self.val_samples) if self.val_samples is not None else len(self.val_arrays[1])


LOADERS = ("torch", "dali")  # as resolved (the config's "auto" is not one)
IMAGE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def view_options(data) -> dict:
    """The DataSpec fields that say how a run's images are viewed (eval crop, resampling filters,
    normalisation), from its config's data section; unset mean/std keep ImageNet's."""
    view = {"crop_pct": data.crop_pct, "train_interpolation": data.train_interpolation,
            "interpolation": data.interpolation}
    if data.mean is not None:
        view["mean"] = tuple(data.mean)
    if data.std is not None:
        view["std"] = tuple(data.std)
    return view


def validate_spec(spec: DataSpec) -> None:
    """ConfigError naming the first bad field; normalises spec.device to a torch.device."""
    _require(spec.dataset in DATASETS, f"dataset: unknown '{spec.dataset}'; choose from {', '.join(DATASETS)}")
    _require(spec.loader in LOADERS, f"loader: unknown '{spec.loader}'; choose from {', '.join(LOADERS)}")
    _require(spec.aug in AUGS, f"aug: unknown '{spec.aug}'; choose from {', '.join(AUGS)}")
    _require(spec.crop_padding_mode in CROP_PADDING_MODES,
             f"crop_padding_mode: unknown '{spec.crop_padding_mode}'; choose from {', '.join(CROP_PADDING_MODES)}")
    for name, low in (("img_size", 8), ("batch_size", 1), ("eval_batch_size", 1), ("workers", 0), ("world_size", 1)):
        value = getattr(spec, name)
        _require(isinstance(value, int) and not isinstance(value, bool) and value >= low,
                 f"{name}: must be an integer >= {low}, got {value!r}")
    _require(isinstance(spec.rank, int) and 0 <= spec.rank < spec.world_size,
             f"rank: must be in 0..{spec.world_size - 1}, got {spec.rank!r}")
    _require(spec.dtype in IMAGE_DTYPES, f"dtype: images must be float32, bfloat16 or float16, got {spec.dtype}")
    _require(spec.crop_pct is None or 0 < spec.crop_pct <= 1,
             f"crop_pct: must be a fraction in (0, 1], got {spec.crop_pct!r}")
    for name in ("train_interpolation", "interpolation"):
        value = getattr(spec, name)
        _require(value in INTERPOLATIONS, f"{name}: unknown {value!r}; choose from {', '.join(INTERPOLATIONS)}")
    _require(len(spec.mean) == 3 and len(spec.std) == 3 and all(s > 0 for s in spec.std),
             f"mean/std: need 3 values each and std > 0, got mean={spec.mean} std={spec.std}")
    _require(spec.train_subset is None or 0 < spec.train_subset <= 1,
             f"train_subset: must be a fraction in (0, 1], got {spec.train_subset!r}")
    _require(spec.val_split is None or 0 < spec.val_split < 1,
             f"val_split: must be a fraction in (0, 1), got {spec.val_split!r}")
    _require(spec.dataset in ("auto", "embedded") or spec.data_dir is not None,
             f"data_dir: dataset '{spec.dataset}' needs a data directory")
    try:
        spec.device = torch.device(spec.device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"device: {e}") from None
