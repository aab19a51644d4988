"""The training configuration: sections owned by components, their YAML files, validation
and the rules for resuming.

`TrainConfig` is the composition of the sections in automix_fast.config.sections
(`cfg.data.batch_size`, `cfg.optim.lr`, ...). Every field name is unique across sections and
is, flat, the YAML key, the flag (with '-' for '_'; timm's names where the meaning is the
same), the key of the config dict stored in checkpoints and a line of `config.yaml`.

Precedence: built-in defaults < `-c/--config FILE` (YAML) < explicit command-line flags. A
file may be flat (`lr: 0.1`) or nested by section (`optim: {lr: 0.1}`).
"""
from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from automix_fast.config.fields import FieldError, coerce, flag_name, require
from automix_fast.config.sections import (DataOptions, MixOptions, NetOptions, OptimOptions, RunOptions,
                                          ScheduleOptions)
from automix_fast.errors import CheckpointError, ConfigError
from automix_fast.atomic import write_text

__all__ = ["AUTO", "CHOICES", "CONFIG_DIR", "RESUMABLE_FIELDS", "FieldError", "TrainConfig", "build_config",
           "coerce_field", "config_changes", "config_yaml", "file_under_flags", "find_config", "flag_name", "idle_flags",
           "load_yaml", "read_older", "read_stored", "resumed_config", "save_config", "validate"]

AUTO = "auto"


@dataclass
class TrainConfig:
    """A training run's config: one section per component (automix_fast.config.sections)."""

    data: DataOptions = field(default_factory=DataOptions)
    net: NetOptions = field(default_factory=NetOptions)
    mixing: MixOptions = field(default_factory=MixOptions)
    optim: OptimOptions = field(default_factory=OptimOptions)
    schedule: ScheduleOptions = field(default_factory=ScheduleOptions)
    run: RunOptions = field(default_factory=RunOptions)

    @classmethod
    def from_flat(cls, values: dict[str, Any]) -> TrainConfig:
        """The config holding these flat field values (defaults for the rest); not checked."""
        unknown = set(values) - set(SECTION_OF)
        if unknown:
            raise ConfigError(f"unknown config key '{sorted(unknown)[0]}'")
        return cls(**{s.name: s.type_(**{k: v for k, v in values.items() if SECTION_OF[k] == s.name})
                      for s in SECTIONS})

    def to_flat(self) -> dict[str, Any]:
        """{field: value}, flat, in the order of `config.yaml` (FLAT_ORDER)."""
        values = {k: getattr(getattr(self, SECTION_OF[k]), k) for k in FLAT_ORDER}
        return {k: list(v) if isinstance(v, list) else v for k, v in values.items()}


@dataclass(frozen=True)
class _Section:
    name: str
    type_: type


SECTIONS = tuple(_Section(f.name, f.default_factory) for f in dataclasses.fields(TrainConfig))
# Every field of every section by its flat name, in section order.
FIELDS: dict[str, dataclasses.Field] = {f.name: f for s in SECTIONS for f in dataclasses.fields(s.type_)}
SECTION_OF: dict[str, str] = {f.name: s.name for s in SECTIONS for f in dataclasses.fields(s.type_)}
assert len(SECTION_OF) == sum(len(dataclasses.fields(s.type_)) for s in SECTIONS), "a field name is in two sections"

# The order of the lines of config.yaml and of the keys of a checkpoint's config dict (fixed, so
# the files of every run list their fields alike); fields not listed here follow in section order.
_WRITTEN_ORDER = (
    "data_dir", "dataset", "loader", "workers", "img_size", "aug", "skip_bad_images", "num_classes", "val_split",
    "model", "epochs", "batch_size", "validation_batch_size", "opt", "lr", "min_lr", "momentum", "weight_decay",
    "sched", "decay_epochs", "warmup_epochs", "warmup_lr", "smoothing", "mix", "mix_alpha", "encoder_momentum",
    "encoder_momentum_end", "mask_loss_weight", "mask_loss_anneal", "mask_margin", "lam_margin", "lam_concat",
    "mask_mode", "mix_stage", "mix_block_lr", "mix_block_min_lr", "mix_block_weight_decay", "kernel_backend",
    "mix_block_momentum", "k_full_forward", "mix_shuffle_no_repeat", "decay_norm_and_bias", "sched_on_updates",
    "device", "amp", "amp_dtype", "channels_last", "torchcompile", "sync_bn", "deterministic", "max_bad_steps", "seed",
    "output", "experiment", "resume", "allow_config_change", "checkpoint_hist", "log_interval", "visualize", "mixup",
    "cutmix", "mixup_prob", "mixup_switch_prob", "mixup_mode", "cutmix_minmax", "model_ema", "model_ema_decay",
    "model_ema_warmup", "clip_grad", "clip_mode", "drop_path", "grad_accum_steps", "initial_checkpoint",
    "log_tensorboard", "train_subset", "train_subset_seed", "mix_block_init", "mix_block_every", "eval_interval",
)
FLAT_ORDER = tuple(k for k in _WRITTEN_ORDER if k in FIELDS) + tuple(k for k in FIELDS if k not in _WRITTEN_ORDER)

# Allowed values of the fields that have a fixed set.
CHOICES: dict[str, tuple[str, ...]] = {k: f.metadata["choices"] for k, f in FIELDS.items() if f.metadata["choices"]}
# The only fields a resumed run may change from the command line (`--resume` with flags): how
# long it runs and how it runs, never what it computes per step. Any other field given with a
# different value is refused unless --allow-config-change.
RESUMABLE_FIELDS = tuple(k for k in FLAT_ORDER if FIELDS[k].metadata["resumable"])


def read_older(values: dict[str, Any]) -> dict[str, Any]:
    """Flat values as today's fields read them, whichever version wrote them (a checkpoint's
    config, a run's config.yaml): a `decay_epochs` list held the epochs at which `sched: step`
    multiplied the lr by 0.1, which is `decay_milestones` of `sched: multistep` (the same
    schedule; `decay_epochs` is now step's period). Returns a new dict when it changes one."""
    if not isinstance(values.get("decay_epochs"), (list, tuple)) or "decay_milestones" in values:
        return values
    values = {**values, "decay_milestones": values["decay_epochs"], "decay_epochs": None}
    if values.get("sched") == "step":
        values["sched"] = "multistep"
    return values


def read_stored(values: dict[str, Any]) -> dict[str, Any]:
    """A config a run stored (a checkpoint's, a config.yaml), as `read_older` reads it, with every
    field it predates at its default, the value that run ran as (a field is added with the
    default that keeps what runs did before it): so a value given on resume (a recipe that now
    sets it) is a change like any other. Returns a new dict when it changes one."""
    values = read_older(values)
    missing = [k for k in FIELDS if k not in values]
    if not values or not missing:
        return values
    defaults = TrainConfig().to_flat()
    return {**values, **{k: defaults[k] for k in missing}}


def coerce_field(name: str, value: Any) -> Any:
    """One value checked and converted for field `name` (ConfigError for an unknown name)."""
    if name not in FIELDS:
        raise ConfigError(f"unknown config key '{name}'")
    return coerce(FIELDS[name], value)


CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs")


def find_config(name: str) -> str:
    """A config path as given, or the name of a shipped config (`cifar100_r18_automix`); a
    folder that is no shipped config's name is refused in one line, as a missing file is."""
    if os.path.isfile(name):
        return name
    found = _shipped(name)
    if found:
        return found
    if os.path.isdir(name):
        yamls = sorted(f for f in os.listdir(name) if f.endswith((".yaml", ".yml")))[:3]
        inside = f" (it holds {', '.join(yamls)})" if yamls else ""
        raise ConfigError(f"config file {name} is a folder, not a YAML file: pass one file in it{inside}")
    names = _shipped_names()
    close = difflib.get_close_matches(Path(name).stem, names, n=1, cutoff=0.8)
    hint = f"; did you mean {close[0]}?" if close else ""
    raise ConfigError(f"config file not found: {name}{hint} (shipped configs: {', '.join(names)})")


def _shipped(name: str) -> str | None:
    for candidate in (os.path.join(CONFIG_DIR, name), os.path.join(CONFIG_DIR, name + ".yaml")):
        if os.path.isfile(candidate):
            return candidate
    return None


def _shipped_names() -> list[str]:
    return sorted(f[:-5] for f in os.listdir(CONFIG_DIR) if f.endswith(".yaml"))


def _flatten(data: dict[str, Any], path: str) -> dict[str, Any]:
    """A file's mapping with section mappings (`optim: {lr: 0.1}`) read as their fields."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if key in SECTION_OF or key == "base":
            items = {key: value}
        elif any(s.name == key for s in SECTIONS) and isinstance(value, dict):
            for sub in value:
                if SECTION_OF.get(sub) != key:
                    raise ConfigError(f"unknown config key '{key}.{sub}' in {path}")
            items = value
        else:
            raise ConfigError(f"unknown config key '{key}' in {path}")
        for sub in items:
            if sub in flat:
                raise ConfigError(f"config key '{sub}' is given twice in {path}, flat and in its section "
                                  f"'{SECTION_OF[sub]}'; keep one")
        flat.update(items)
    return flat


def _unique_keys_loader():
    """yaml.SafeLoader that refuses a mapping key given twice (PyYAML keeps the last one without
    a word; YAML says keys are unique). Keys merged in with `<<` may still be overridden."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                    continue
                key = self.construct_object(key_node)
                line = key_node.start_mark.line + 1
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        problem=f"key '{key}' is given twice (lines {seen[key]} and {line}); keep one")
                seen[key] = line
            return super().construct_mapping(node, deep)

    return UniqueKeyLoader


def load_yaml(path: str, _seen: tuple = ()) -> dict[str, Any]:
    """Flat field values from a YAML file; `base: other.yaml` (beside the file, else a shipped config; never the current folder) is read first."""
    import yaml

    path = find_config(path)
    if os.path.abspath(path) in _seen:
        raise ConfigError(f"config file {path} includes itself through 'base'")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.load(f, Loader=_unique_keys_loader()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    except UnicodeDecodeError as e:  # e.g. Latin-1, or UTF-16 as Windows Notepad saves "Unicode"
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {e.start}: {e.reason}); "
                          "save it as UTF-8") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of field: value")
    data = _flatten(data, path)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"config key 'base' in {path} must be a file name, got {base!r}")
    beside = os.path.join(os.path.dirname(path), base)  # a file next to this one, else a shipped config
    found = beside if os.path.isfile(beside) else _shipped(base)
    if found is None:
        raise ConfigError(f"base: {base} in {path} is neither beside it nor a shipped config "
                          f"({', '.join(_shipped_names())})")
    merged = load_yaml(found, _seen + (os.path.abspath(path),))
    merged.update(data)
    return merged


def build_config(file_values: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Defaults, then the YAML values, then explicit overrides (all flat); every value checked.
    An error about a value from the file names the flag and the file's key: `--lr (lr in the
    config file)`."""
    file_values, overrides = read_older(file_values or {}), read_older(overrides or {})
    file_values = file_under_flags(file_values, overrides)
    values: dict[str, Any] = {}
    try:
        for source in (file_values, overrides):
            from_file = source is file_values
            for key, value in source.items():
                values[key] = coerce_field(key, value)
        from_file = False
        resolve_mixup_cutmix(values)
        cfg = TrainConfig.from_flat(values)
        validate(cfg)
    except FieldError as e:
        if from_file or (e.field in file_values and e.field not in overrides):
            raise ConfigError(f"{flag_name(e.field)} ({e.field} in the config file) {e.problem}") from None
        raise
    return cfg


def validate(cfg: TrainConfig) -> None:
    """Choice and range checks, each section's then those across sections; one ConfigError
    naming the first bad field."""
    for s in SECTIONS:
        getattr(cfg, s.name).check()
    data, mixing = cfg.data, cfg.mixing
    require(mixing.mix == "vanilla" or data.batch_size >= 2, "batch_size",
            f"must be at least 2 to mix pairs (--mix {mixing.mix})", data.batch_size)
    require(mixing.mixup_mode != "pair" or data.batch_size % 2 == 0, "batch_size",
            "must be even for --mixup-mode pair (partners come in twos)", data.batch_size)
    sched, optim = cfg.schedule, cfg.optim
    require(0 <= sched.min_lr <= optim.lr, "min_lr", "must be between 0 and --lr", sched.min_lr)
    if mixing.mix == "automix":  # the Mix Block's group: its own floor and lr, or the model's
        floor = sched.min_lr if sched.mix_block_min_lr is None else sched.mix_block_min_lr
        lr = optim.lr if optim.mix_block_lr is None else optim.mix_block_lr
        unset = " (unset: --min-lr)" if sched.mix_block_min_lr is None else ""
        require(floor <= lr, "mix_block_min_lr", f"must be at most the Mix Block's learning rate {lr:g}{unset}", floor)
    if cfg.run.cuda_graph:
        check_cuda_graph(cfg)


# Fields that only one setting reads, each with that setting's test and its name: a value given
# while the setting is off changes nothing (timm ignores such flags silently; we say so). Left
# out: --kernel-backend, which says how the Mix Block's ops run, not what a run computes, and
# which scripts pass to every run.
_AUTOMIX_ONLY = ("encoder_momentum", "encoder_momentum_end", "mask_loss_weight", "mask_loss_anneal", "mask_margin",
                 "lam_margin", "lam_concat", "mask_mode", "mix_stage", "k_full_forward",
                 "mix_shuffle_no_repeat", "mix_block_init", "mix_block_every", "q_batched", "mix_block_lr",
                 "mix_block_weight_decay", "mix_block_momentum", "mix_block_min_lr")
_READ_ONLY_WITH: dict[str, tuple[Any, str]] = {
    **dict.fromkeys(_AUTOMIX_ONLY, (lambda c: c.mixing.mix == "automix", "--mix automix")),
    **dict.fromkeys(("mixup_prob", "mixup_switch_prob"),
                    (lambda c: c.mixing.mix in ("mixup", "cutmix"), "--mix mixup/cutmix")),
    "mix_alpha": (lambda c: c.mixing.mix != "vanilla", "a --mix that mixes"),
    "model_ema_decay": (lambda c: c.mixing.model_ema, "--model-ema"),
    **dict.fromkeys(("torchcompile_mode", "torchcompile_scope"), (lambda c: bool(c.run.torchcompile), "--torchcompile")),
    "amp_dtype": (lambda c: c.run.amp is not False, "--amp"),
    "decay_epochs": (lambda c: c.schedule.sched == "step", "--sched step"),
    "decay_milestones": (lambda c: c.schedule.sched == "multistep", "--sched multistep"),
    "decay_rate": (lambda c: c.schedule.sched in ("step", "multistep"), "--sched step/multistep"),
    # Only the cifar aug pads its crop; auto may resolve to it (up to 64 px), so only an explicit imagenet is idle.
    "crop_padding_mode": (lambda c: c.data.aug != "imagenet", "--aug cifar"),
}


def idle_flags(cfg: TrainConfig, typed: dict[str, Any]) -> str | None:
    """One line naming the typed flags (`typed`: field -> value given on the command line) that
    `cfg` never reads, grouped by the setting each needs; None when every one is read."""
    needs: dict[str, list[str]] = {}
    for key in typed:
        rule = _READ_ONLY_WITH.get(key)
        if rule is not None and not rule[0](cfg):
            needs.setdefault(rule[1], []).append(flag_name(key))
    if not needs:
        return None
    parts = [f"{', '.join(flags)} (read only with {setting})" for setting, flags in needs.items()]
    return f"warning: these flags change nothing in this run: {'; '.join(parts)}"


CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # torch.compile modes that capture CUDA graphs themselves


def check_cuda_graph(cfg: TrainConfig) -> None:
    """What --cuda-graph's static-buffer step can run (engine/static_step.py)."""
    run = cfg.run
    require(cfg.optim.opt in ("sgd", "adamw"), "cuda_graph",
            f"needs --opt sgd or adamw (torch's fused kernels skip a bad step on the device), not --opt {cfg.optim.opt}",
            None)
    require(not (run.torchcompile and run.torchcompile_mode in CUDA_GRAPH_MODES), "cuda_graph",
            f"does not combine with --torchcompile-mode {run.torchcompile_mode} (inductor captures CUDA graphs of its "
            "own there): use --torchcompile-mode default or max-autotune-no-cudagraphs, or leave out one of the two", None)
    require(run.torchcompile != "cudagraphs", "cuda_graph",
            "does not combine with --torchcompile cudagraphs (that backend captures CUDA graphs of its own): use "
            "--torchcompile inductor, or leave out one of the two", None)


# ---- timm's mixup/cutmix flags -------------------------------------------------------------
def file_under_flags(file_values: dict[str, Any], flags: dict[str, Any]) -> dict[str, Any]:
    """The file's values that still apply under these command-line values: the command line
    picks the mixing policy as a whole. Given --mixup/--cutmix, the file's `mix` and
    `mix_alpha` do not apply; given a --mix other than the file's (the default automix when
    the file names none), the file's `mix_alpha` does not apply unless --mix-alpha is given
    too. Returns a new dict when it drops a key."""
    drop: tuple[str, ...] = ()
    if flags.get("mixup") is not None or flags.get("cutmix") is not None:
        drop = ("mix", "mix_alpha")
    elif flags.get("mix") is not None and flags["mix"] != file_values.get("mix", FIELDS["mix"].default):
        drop = ("mix_alpha",)
    if not any(k in file_values for k in drop):
        return file_values
    return {k: v for k, v in file_values.items() if k not in drop}


def resolve_mixup_cutmix(values: dict[str, Any]) -> None:
    """Pick `mix` from timm's --mixup/--cutmix (in place, on the explicitly given values).

    Given neither, `mix` and `mix_alpha` decide alone. Given either, they are the alphas
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


# ---- config.yaml and resuming --------------------------------------------------------------
def config_yaml(cfg: TrainConfig, resolved: dict[str, Any] | None = None) -> str:
    """The config as flat YAML, each null/auto value followed by a comment saying what it ran as
    (`amp: null  # ran as false`): loaded with -c, the file asks for what this run asked for, so
    those values are worked out again for the new flags and machine."""
    import yaml

    values = cfg.to_flat()
    ran = {key: value for key, value in (resolved or {}).items()
           if values.get(key) in (None, AUTO) and value != values.get(key)}
    lines = yaml.safe_dump(values, sort_keys=False).splitlines()
    for i, line in enumerate(lines):
        key = line.split(":", 1)[0]
        if key in ran:
            shown = yaml.safe_dump([ran[key]], default_flow_style=True).strip()[1:-1]  # a value, as YAML writes it
            lines[i] = f"{line}  # ran as {shown}"
    return "\n".join(lines) + "\n"


def save_config(cfg: TrainConfig, path: str, resolved: dict[str, Any] | None = None) -> None:
    write_text(path, config_yaml(cfg, resolved), "config")


def _stored(old: dict[str, Any], key: str) -> Any:
    """A stored value as the field reads it now (`mask_loss_anneal: true` reads as cosine)."""
    try:
        return coerce_field(key, old[key])
    except ConfigError:
        return old[key]


def config_changes(old: dict[str, Any], new: TrainConfig) -> list[str]:
    """Fields outside RESUMABLE_FIELDS whose values differ between a checkpoint's config and this one."""
    old, values = read_stored(old), new.to_flat()
    return [k for k in FLAT_ORDER if k not in RESUMABLE_FIELDS and k in old and _stored(old, k) != values[k]]


def resumed_config(found, given: dict[str, Any]) -> TrainConfig:
    """The config to continue with: the one stored in the checkpoint `found` (path, state), with
    the `given` values (explicit flags and -c file values) of fields that may change on resume."""
    path, state = found
    stored = state.get("config")
    if not isinstance(stored, dict):
        raise CheckpointError(f"{path} holds no training config to resume with")
    values = {k: v for k, v in read_stored(stored).items() if k in FIELDS}  # fields of older versions are dropped
    given = {k: coerce_field(k, v) for k, v in read_older(given).items()}
    changed = [k for k, v in given.items() if k not in RESUMABLE_FIELDS and k in values and v != _stored(values, k)]
    if changed and not given.get("allow_config_change"):
        details = ", ".join(f"{flag_name(k)} ({_stored(values, k)!r} -> {given[k]!r})" for k in changed)
        may = ", ".join(flag_name(k) for k in RESUMABLE_FIELDS if k not in ("resume", "output", "experiment"))
        raise ConfigError(
            f"resuming {path}: {details} cannot change on resume (the run continues with its stored config; "
            f"only {may} may), or pass --allow-config-change to force it"
        )
    values.update(given)
    if given.get("resume") != "auto":
        # --resume PATH: keep writing beside the checkpoint, wherever that folder is now; a fork
        # (--experiment) goes beside that folder unless --output is given.
        folder = Path(path).resolve().parent
        if "experiment" not in given:
            values.update(output=str(folder.parent), experiment=folder.name)
        elif "output" not in given:
            values.update(output=str(folder.parent))
    return build_config(overrides=values)  # errors name the flags, not "the config file"
