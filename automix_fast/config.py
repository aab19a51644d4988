"""The training configuration: one dataclass, its YAML files, and its validation.

Precedence: built-in defaults < `-c/--config FILE` (YAML) < explicit command-line flags.
Field names are the YAML keys and, with '-' for '_', the flags (timm's names where the
meaning is the same). The resolved config is saved as `config.yaml` in the run folder.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, fields
from typing import Any

from automix_fast.errors import ConfigError

AUTO = "auto"


@dataclass
class TrainConfig:
    # data
    data_dir: str | None = None  # none: the embedded default dataset
    dataset: str = "auto"  # auto | embedded | folder | cifar10 | cifar100
    loader: str = "auto"  # auto (dali when installed and useful) | dali | torch
    workers: int = 2
    img_size: int | None = None  # none: the model's default
    aug: str = "auto"  # auto | cifar | imagenet
    skip_bad_images: bool = False
    num_classes: int | None = None  # none: from the data; a mismatch is an error
    val_split: float | None = None  # hold out this class-balanced part of a folder without val/ (fixed seed)
    # model
    model: str = "tinynet"
    # optimisation
    epochs: int = 15
    batch_size: int = 64  # per process
    validation_batch_size: int | None = None
    opt: str = "sgd"
    lr: float = 0.05  # with one warmup epoch: measured best of the two tried for the default run
    min_lr: float = 0.0
    momentum: float = 0.9
    weight_decay: float = 5e-4
    sched: str = "cosine"  # cosine | step | const
    decay_epochs: list | None = None  # for sched=step
    warmup_epochs: float | None = None  # none: 1 epoch, at most a quarter of the run (engine/schedule.py)
    warmup_lr: float = 1e-5
    smoothing: float = 0.0
    # mixing
    mix: str = "automix"  # vanilla | mixup | cutmix | automix
    mix_alpha: float | None = None  # none: 1.0 mixup, 0.2 cutmix, 2.0 automix
    # AutoMix
    # The defaults suit the short default run (~1,200 steps); the shipped recipes set 0.999 ->
    # 0.999999 (CIFAR, Tiny) or 0.99999 (ImageNet) as OpenMixup does for 100k+ steps.
    encoder_momentum: float = 0.99
    encoder_momentum_end: float = 0.999
    mask_loss_weight: float = 0.1
    mask_loss_anneal: str = "none"  # none | cosine | compound (official ImageNet hook)
    mask_margin: float = 0.1
    lam_margin: float = 0.08
    lam_concat: bool = False
    mask_mode: str = "nearest"  # nearest | bilinear
    mix_stage: int | None = None  # none: the model's (stage 3 of a ResNet)
    mix_block_lr: float | None = None  # none: lr
    mix_block_min_lr: float | None = None  # none: min_lr
    mix_block_weight_decay: float | None = None  # none: weight_decay
    kernel_backend: str = "auto"  # auto | triton | torch
    mix_block_momentum: float | None = None  # none: momentum (SGD momentum of the Mix Block group)
    k_full_forward: bool = True  # k runs all its stages on the clean batch (official); false: to the mix stage only
    mix_shuffle_no_repeat: bool = False  # permutations without fixed points (official fine-grained recipes)
    decay_norm_and_bias: bool = False  # weight decay on every parameter (official/mmcv); false: timm's exemption
    sched_on_updates: bool = False  # timm's: the cosine moves every step; false: once per epoch (mmcv, official)
    # engine
    device: str = "auto"  # auto | cpu | cuda
    amp: bool | None = None  # none: on with CUDA
    amp_dtype: str = "bfloat16"  # bfloat16 | float16
    channels_last: bool | None = None  # none: on with CUDA
    torchcompile: bool = False
    sync_bn: bool = False
    deterministic: bool = False
    max_bad_steps: int = 20
    seed: int = 42
    # output
    output: str = "output"
    experiment: str | None = None
    resume: str | None = None  # a checkpoint path, or "auto"
    allow_config_change: bool = False
    checkpoint_hist: int = 3
    log_interval: int = 50
    visualize: bool = True
    # ---- timm's training flags, with timm's meanings (docs/TIMM_FLAGS.md) ----
    mixup: float | None = None  # mixup alpha; 0 disables; none: not given (see resolve_mixup_cutmix)
    cutmix: float | None = None  # cutmix alpha; with mixup > 0 too, one of the two per batch
    mixup_prob: float = 1.0  # probability of mixing a batch at all (mixup/cutmix)
    mixup_switch_prob: float = 0.5  # probability of cutmix when both alphas are positive
    mixup_mode: str = "batch"  # batch | pair | elem: who shares one draw of lambda and kind
    cutmix_minmax: list | None = None  # [min, max] fractions of the side: box sizes drawn there, not from lambda
    model_ema: bool = False  # an EMA copy of the weights, evaluated as head `ema` (baselines only)
    model_ema_decay: float = 0.9998
    model_ema_warmup: bool = False  # timm's EMA warm-up: decay min(D, 1 - t^(-2/3)) at the t-th update
    clip_grad: float | None = None  # none: no clipping
    clip_mode: str = "norm"  # norm | value | agc
    drop_path: float | None = None  # stochastic depth rate of the last block (ResNet family, WRN)
    grad_accum_steps: int = 1  # micro-batches per optimizer step
    initial_checkpoint: str | None = None  # start from these weights (no optimizer or step state)
    log_tensorboard: bool = False  # TensorBoard event files in RUN/tensorboard/
    # quality study (issue 14, docs/QUALITY.md): less data, and Mix Block options off the saddle
    train_subset: float | None = None  # none: all of it; else a seeded class-balanced fraction in (0, 1]
    train_subset_seed: int = 0  # draws the subset (not --seed: every seed of a study sees the same images)
    mix_block_init: str = "official"  # official | scaled | cosine | cosine-centered (mixing/mixblock.py)
    mix_block_every: int = 1  # update the Mix Block every N-th step; other steps skip its branch
    eval_interval: int = 1  # evaluate after every N-th epoch and the last (validation is costly on a CPU)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


CHOICES = {
    "dataset": ("auto", "embedded", "folder", "cifar10", "cifar100"),
    "loader": ("auto", "dali", "torch"),
    "aug": ("auto", "cifar", "imagenet"),
    "opt": ("sgd", "adamw", "fused_sgd", "apex_sgd"),
    "sched": ("cosine", "step", "const"),
    "mix": ("vanilla", "mixup", "cutmix", "automix"),
    "mask_mode": ("nearest", "bilinear"),
    "mask_loss_anneal": ("none", "cosine", "compound"),
    "kernel_backend": ("auto", "triton", "torch"),
    "device": ("auto", "cpu", "cuda"),
    "amp_dtype": ("bfloat16", "float16"),
    "clip_mode": ("norm", "value", "agc"),
    "mix_block_init": ("official", "scaled", "cosine", "cosine-centered"),
    "mixup_mode": ("batch", "pair", "elem"),
}
# (element type, argparse nargs, metavar) of the list fields other than the default (int, "+").
LIST_ITEMS = {"cutmix_minmax": (float, 2, ("MIN", "MAX"))}

# The only fields a resumed run may change from the command line (`--resume` with flags): how
# long it runs and how it runs, never what it computes per step. Any other field given with a
# different value is refused unless --allow-config-change. New fields are fixed by default.
RESUMABLE_FIELDS = (
    "epochs", "workers", "loader", "device", "kernel_backend", "validation_batch_size", "torchcompile",
    "max_bad_steps", "skip_bad_images", "checkpoint_hist", "log_interval", "visualize", "eval_interval",
    "output", "experiment", "resume", "allow_config_change",
)


def flag_name(name: str) -> str:
    """The command-line flag of field `name` (`model_ema` -> `--model-ema`)."""
    return "--" + name.replace("_", "-")


class FieldError(ConfigError):
    """A bad value of one field; the message names its flag (`--model-ema must ...`)."""

    def __init__(self, name: str, problem: str):
        self.field, self.problem = name, problem
        super().__init__(f"{flag_name(name)} {problem}")


def field_types() -> dict[str, Any]:
    return {f.name: f.type for f in fields(TrainConfig)}


def coerce_field(name: str, value: Any) -> Any:
    """One value checked and converted for field `name` (ConfigError for an unknown name)."""
    types = field_types()
    if name not in types:
        raise ConfigError(f"unknown config key '{name}'")
    return _coerce(name, value, str(types[name]))


def _coerce(name: str, value: Any, type_str: str) -> Any:
    """Check and convert one value against the dataclass annotation (kept as a string)."""
    if name == "mask_loss_anneal" and isinstance(value, bool):  # configs and checkpoints before the 3-way choice
        value = "cosine" if value else "none"
    optional = "None" in type_str
    if value is None:
        if optional:
            return None
        raise FieldError(name, f"must not be empty")
    base = type_str.replace(" | None", "").strip()
    if base == "bool":
        if isinstance(value, bool):
            return value
        raise FieldError(name, f"must be true or false, got {value!r}")
    if base == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise FieldError(name, f"must be an integer, got {value!r}")
        return value
    if base == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise FieldError(name, f"must be a number, got {value!r}")
        return float(value)
    if base == "str":
        if not isinstance(value, str):
            raise FieldError(name, f"must be a string, got {value!r}")
        return value
    if base == "list":
        if not isinstance(value, (list, tuple)):
            raise FieldError(name, f"must be a list, got {value!r}")
        if LIST_ITEMS.get(name, (int,))[0] is float:
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
                raise FieldError(name, f"must be a list of numbers, got {value!r}")
            return [float(v) for v in value]
        return list(value)
    return value


CONFIG_DIR = os.path.join(os.path.dirname(__file__), "configs")


def find_config(name: str) -> str:
    """A config path as given, or the name of a shipped config (`cifar100_r18_automix`)."""
    if os.path.isfile(name):
        return name
    for candidate in (os.path.join(CONFIG_DIR, name), os.path.join(CONFIG_DIR, name + ".yaml")):
        if os.path.isfile(candidate):
            return candidate
    shipped = ", ".join(sorted(f[:-5] for f in os.listdir(CONFIG_DIR) if f.endswith(".yaml")))
    raise ConfigError(f"config file not found: {name} (shipped configs: {shipped})")


def load_yaml(path: str, _seen: tuple = ()) -> dict[str, Any]:
    """Field values from a YAML file; `base: other.yaml` (relative to the file) is read first."""
    import yaml

    path = find_config(path)
    if os.path.abspath(path) in _seen:
        raise ConfigError(f"config file {path} includes itself through 'base'")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of field: value")
    known = field_types()
    for key in data:
        if key not in known and key != "base":
            raise ConfigError(f"unknown config key '{key}' in {path}")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"config key 'base' in {path} must be a file name, got {base!r}")
    beside = os.path.join(os.path.dirname(path), base)  # a file next to this one, else a shipped config
    merged = load_yaml(beside if os.path.isfile(beside) else base, _seen + (os.path.abspath(path),))
    merged.update(data)
    return merged


def build_config(file_values: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Defaults, then the YAML values, then explicit overrides; every value checked. An error
    about a value from the file names the flag and the file's key: `--lr (lr in the config file)`."""
    types = field_types()
    file_values, overrides = file_values or {}, overrides or {}
    values: dict[str, Any] = {}
    try:
        for source in (file_values, overrides):
            from_file = source is file_values
            for key, value in source.items():
                if key not in types:
                    raise ConfigError(f"unknown config key '{key}'")
                values[key] = _coerce(key, value, str(types[key]))
        from_file = False
        resolve_mixup_cutmix(values)
        cfg = TrainConfig(**values)
        validate(cfg)
    except FieldError as e:
        if from_file or (e.field in file_values and e.field not in overrides):
            raise ConfigError(f"{flag_name(e.field)} ({e.field} in the config file) {e.problem}") from None
        raise
    return cfg


def _require(ok: bool, name: str, what: str, value: Any) -> None:
    if not ok:  # a switch or an unset value says nothing more than `what`
        raise FieldError(name, what if isinstance(value, bool) or value is None else f"{what}, got {value!r}")


def validate(cfg: TrainConfig) -> None:
    """Range and choice checks; one ConfigError naming the first bad field."""
    for name, choices in CHOICES.items():
        value = getattr(cfg, name)
        _require(value in choices, name, f"must be one of {', '.join(choices)}", value)
    _require(cfg.batch_size >= 1, "batch_size", "must be at least 1", cfg.batch_size)
    _require(cfg.mix == "vanilla" or cfg.batch_size >= 2, "batch_size", f"must be at least 2 to mix pairs (--mix {cfg.mix})", cfg.batch_size)
    if cfg.validation_batch_size is not None:
        _require(cfg.validation_batch_size >= 1, "validation_batch_size", "must be at least 1", cfg.validation_batch_size)
    _require(cfg.epochs >= 1, "epochs", "must be at least 1", cfg.epochs)
    _require(cfg.workers >= 0, "workers", "must be 0 or more", cfg.workers)
    if cfg.img_size is not None:
        _require(cfg.img_size >= 8, "img_size", "must be at least 8", cfg.img_size)
    if cfg.num_classes is not None:
        _require(cfg.num_classes >= 2, "num_classes", "must be at least 2", cfg.num_classes)
    _require(cfg.lr > 0, "lr", "must be positive", cfg.lr)
    _require(0 <= cfg.min_lr <= cfg.lr, "min_lr", "must be between 0 and --lr", cfg.min_lr)
    _require(0 <= cfg.momentum < 1, "momentum", "must be in [0, 1)", cfg.momentum)
    _require(cfg.weight_decay >= 0, "weight_decay", "must be 0 or more", cfg.weight_decay)
    if cfg.warmup_epochs is not None:
        _require(cfg.warmup_epochs >= 0, "warmup_epochs", "must be 0 or more", cfg.warmup_epochs)
    _require(0 <= cfg.smoothing < 1, "smoothing", "must be in [0, 1)", cfg.smoothing)
    if cfg.mix_alpha is not None:
        _require(cfg.mix_alpha > 0, "mix_alpha", "must be positive (Beta(alpha, alpha))", cfg.mix_alpha)
    _require(0 < cfg.encoder_momentum < 1, "encoder_momentum", "must be in (0, 1)", cfg.encoder_momentum)
    _require(0 < cfg.encoder_momentum_end < 1, "encoder_momentum_end", "must be in (0, 1)", cfg.encoder_momentum_end)
    _require(cfg.mask_loss_weight >= 0, "mask_loss_weight", "must be 0 or more", cfg.mask_loss_weight)
    _require(cfg.mask_margin >= 0, "mask_margin", "must be 0 or more", cfg.mask_margin)
    _require(0 <= cfg.lam_margin < 0.5, "lam_margin", "must be in [0, 0.5)", cfg.lam_margin)
    if cfg.mix_stage is not None:
        _require(cfg.mix_stage >= 1, "mix_stage", "must be at least 1", cfg.mix_stage)
    if cfg.mix_block_lr is not None:
        _require(cfg.mix_block_lr > 0, "mix_block_lr", "must be positive", cfg.mix_block_lr)
    if cfg.mix_block_weight_decay is not None:
        _require(cfg.mix_block_weight_decay >= 0, "mix_block_weight_decay", "must be 0 or more", cfg.mix_block_weight_decay)
    if cfg.mix_block_momentum is not None:
        _require(0 <= cfg.mix_block_momentum < 1, "mix_block_momentum", "must be in [0, 1)", cfg.mix_block_momentum)
    if cfg.mix_block_min_lr is not None:
        _require(cfg.mix_block_min_lr >= 0, "mix_block_min_lr", "must be 0 or more", cfg.mix_block_min_lr)
    _require(cfg.max_bad_steps >= 1, "max_bad_steps", "must be at least 1", cfg.max_bad_steps)
    _require(cfg.checkpoint_hist >= 1, "checkpoint_hist", "must be at least 1", cfg.checkpoint_hist)
    _require(cfg.log_interval >= 1, "log_interval", "must be at least 1", cfg.log_interval)
    _require(cfg.resume != "auto" or bool(cfg.experiment), "experiment",
             "must name the run folder to continue with --resume auto (--experiment NAME)", cfg.experiment)
    if cfg.sched == "step":
        _require(bool(cfg.decay_epochs), "decay_epochs", "must list epochs when --sched is step", cfg.decay_epochs)
    validate_timm_flags(cfg)
    if cfg.val_split is not None:
        _require(0 < cfg.val_split < 1, "val_split", "must be a fraction in (0, 1)", cfg.val_split)
    if cfg.train_subset is not None:
        _require(0 < cfg.train_subset <= 1, "train_subset", "must be a fraction in (0, 1]", cfg.train_subset)
    _require(cfg.mix_block_every >= 1, "mix_block_every", "must be at least 1", cfg.mix_block_every)
    _require(cfg.eval_interval >= 1, "eval_interval", "must be at least 1", cfg.eval_interval)


# ---- timm's training flags ----------------------------------------------------------------
def resolve_mixup_cutmix(values: dict[str, Any]) -> None:
    """Pick `mix` from timm's --mixup/--cutmix (in place, on the explicitly given values).

    Given neither, `mix` and `mix_alpha` decide as before. Given either, they are the alphas
    of the baseline policy (0 or absent: off) and `mix` follows: mixup when mixup > 0, else
    cutmix when cutmix > 0, else vanilla (timm trains unmixed with both 0). An explicit
    `mix` must agree (mixup or cutmix with its alpha > 0; both names mean the same switching
    policy when both alphas are positive); automix and `mix_alpha` do not combine with them.
    """
    resolve_cutmix_minmax(values)
    mixup, cutmix = values.get("mixup"), values.get("cutmix")
    if mixup is None and cutmix is None:
        return
    given = " ".join(f"--{k} {v:g}" for k, v in (("mixup", mixup), ("cutmix", cutmix)) if v is not None)
    if values.get("mix_alpha") is not None:
        raise ConfigError(f"{given} gives the alphas; drop --mix-alpha {values['mix_alpha']:g} (it is for --mix alone)")
    alphas = {"mixup": mixup or 0.0, "cutmix": cutmix or 0.0}
    if min(alphas.values()) < 0:
        raise ConfigError(f"{given}: alphas must be 0 (off) or positive")
    resolved = "mixup" if alphas["mixup"] > 0 else "cutmix" if alphas["cutmix"] > 0 else "vanilla"
    mix = values.get("mix")
    if mix is None:
        values["mix"] = resolved
    elif mix in alphas and alphas[mix] > 0 or mix == resolved:
        return
    elif mix == "automix":
        raise ConfigError(f"{given} sets the mixup/cutmix baselines and does not combine with --mix automix "
                          "(AutoMix's lambda comes from --mix-alpha)")
    else:
        raise ConfigError(f"--mix {mix} disagrees with {given} (which means --mix {resolved}); give one of them")


def resolve_cutmix_minmax(values: dict[str, Any]) -> None:
    """timm's --cutmix-minmax turns cutmix on (timm sets its cutmix alpha to 1): given with
    neither --cutmix nor a --mix that cutmixes, it stands for --cutmix 1.0. With --mix automix,
    or a --mix mixup/vanilla that names no cutmix, it is an error (it would do nothing)."""
    minmax = values.get("cutmix_minmax")
    if minmax is None:
        return
    given = "--cutmix-minmax " + " ".join(f"{v:g}" for v in minmax)
    if len(minmax) != 2 or not 0 <= minmax[0] < minmax[1] <= 1:
        raise ConfigError(f"{given}: give two fractions of the image side, 0 <= min < max <= 1")
    mix, flags = values.get("mix"), values.get("mixup") is not None or values.get("cutmix") is not None
    if mix == "automix":
        raise ConfigError(f"{given} sets cutmix boxes and does not combine with --mix automix")
    if mix not in (None, "cutmix") and not flags:
        raise ConfigError(f"{given} sets cutmix boxes, but --mix {mix} does not cutmix; use --mix cutmix, or "
                          f"--mixup A {given} for mixup and cutmix by turns")
    if mix is None and values.get("mix_alpha") is not None and not flags:
        raise ConfigError(f"{given} turns cutmix on (as --cutmix 1.0); --mix-alpha goes with --mix: give "
                          "--mix cutmix with it, or --mixup A for a mixup alpha")
    if (flags or mix is None) and not values.get("cutmix"):
        values["cutmix"] = 1.0


# --help texts of the fields above (cli.py merges them into its own).
TIMM_HELP = {
    "mixup": "mixup alpha, as timm (0: off); with --cutmix too, one of the two per batch (sets --mix; see docs/TIMM_FLAGS.md)",
    "cutmix": "cutmix alpha, as timm (0: off)",
    "mixup_prob": "probability of mixing a batch at all (mixup/cutmix)",
    "mixup_switch_prob": "probability of cutmix rather than mixup for a batch when both alphas are positive",
    "model_ema": "keep an EMA copy of the weights, evaluated as head 'ema' (vanilla/mixup/cutmix)",
    "model_ema_decay": "decay of the EMA copy per optimizer step",
    "model_ema_warmup": "timm's EMA warm-up: the t-th update's decay is 1 - t^(-2/3) until that reaches --model-ema-decay",
    "mixup_mode": "who shares one draw of lambda and mixup/cutmix: the batch, each pair of partners, or each image (elem)",
    "cutmix_minmax": "cutmix box height and width uniform in these fractions of the image's, not from lambda "
                     "(turns cutmix on, as timm)",
    "clip_grad": "gradient clipping threshold (none: off); fp16 gradients are unscaled first",
    "clip_mode": "norm: total L2 norm; value: each element; agc: adaptive (the value is the clip factor)",
    "drop_path": "stochastic depth: drop rate of the last residual block, rising linearly from 0 (ResNet family, WRN)",
    "grad_accum_steps": "micro-batches of --batch-size per optimizer step; schedules and EMA count optimizer steps",
    "initial_checkpoint": "start from the model weights of this checkpoint (not its optimizer, step or epoch)",
    "log_tensorboard": "also write TensorBoard event files to RUN/tensorboard/ (needs the tensorboard package)",
}


def validate_timm_flags(cfg: TrainConfig) -> None:
    _require(0 <= cfg.mixup_prob <= 1, "mixup_prob", "must be in [0, 1]", cfg.mixup_prob)
    _require(0 <= cfg.mixup_switch_prob <= 1, "mixup_switch_prob", "must be in [0, 1]", cfg.mixup_switch_prob)
    _require(0 < cfg.model_ema_decay < 1, "model_ema_decay", "must be in (0, 1)", cfg.model_ema_decay)
    _require(cfg.model_ema or not cfg.model_ema_warmup, "model_ema_warmup", "needs --model-ema", cfg.model_ema_warmup)
    baseline = cfg.mix in ("mixup", "cutmix")
    _require(baseline or cfg.mixup_mode == "batch", "mixup_mode", f"is for --mix mixup/cutmix (not --mix {cfg.mix})",
             cfg.mixup_mode)
    _require(cfg.mixup_mode != "pair" or cfg.batch_size % 2 == 0, "batch_size",
             "must be even for --mixup-mode pair (partners come in twos)", cfg.batch_size)
    _require(not (cfg.model_ema and cfg.mix == "automix"), "model_ema",
             "is for the baselines; AutoMix's momentum encoder k (heads k_one, k_mix) is its EMA model, "
             "set by --encoder-momentum", cfg.model_ema)
    if cfg.clip_grad is not None:
        _require(cfg.clip_grad > 0, "clip_grad", "must be positive", cfg.clip_grad)
    if cfg.drop_path is not None:
        _require(0 <= cfg.drop_path < 1, "drop_path", "must be in [0, 1)", cfg.drop_path)
    _require(cfg.grad_accum_steps >= 1, "grad_accum_steps", "must be at least 1", cfg.grad_accum_steps)


def config_yaml(cfg: TrainConfig, resolved: dict[str, Any] | None = None) -> str:
    """The config as YAML, with `resolved` values in place of null/auto ones, each marked with
    a comment saying what was asked (so the file shows what ran and still loads with -c)."""
    import yaml

    values = cfg.to_dict()
    asked = {}
    for key, value in (resolved or {}).items():
        if values.get(key) in (None, AUTO) and value != values.get(key):
            asked[key] = values[key]
            values[key] = value
    lines = yaml.safe_dump(values, sort_keys=False).splitlines()
    for i, line in enumerate(lines):
        key = line.split(":", 1)[0]
        if key in asked:
            lines[i] = f"{line}  # resolved from {'null' if asked[key] is None else asked[key]}"
    return "\n".join(lines) + "\n"


def save_config(cfg: TrainConfig, path: str, resolved: dict[str, Any] | None = None) -> None:
    from automix_fast.rundir import write_text

    write_text(path, config_yaml(cfg, resolved), "config")


def config_changes(old: dict[str, Any], new: TrainConfig) -> list[str]:
    """Fields outside RESUMABLE_FIELDS whose values differ between a checkpoint's config and this one."""
    types = field_types()

    def stored(k):  # old spellings (mask_loss_anneal: true) read as today's values
        try:
            return _coerce(k, old[k], str(types[k]))
        except ConfigError:
            return old[k]

    return [f.name for f in fields(TrainConfig)
            if f.name not in RESUMABLE_FIELDS and f.name in old and stored(f.name) != getattr(new, f.name)]
