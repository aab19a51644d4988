"""How a config field is declared: its default with its help, choices, flag aliases, list
items and whether a resumed run may change it, all in the dataclass field's metadata.

A section is a dataclass of `option(...)` fields; the command line, the YAML keys, the checks
and the resume rules are all read from that metadata (automix_fast.config), so an option is
declared once, in its section.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

from automix_fast.errors import ConfigError


def option(default: Any = None, help: str = "", *, choices: tuple[str, ...] | None = None,
        aliases: tuple[str, ...] = (), items: tuple | None = None, resumable: bool = False,
        const: tuple[str, str] | None = None):
    """A config field. `help` is its --help line (the default is added); `choices` its allowed
    values (None is allowed too when the type is optional); `aliases` short flags (`-b`); `items`
    for a list field (element type, argparse nargs, metavar), default (int, "+", None);
    `resumable`: flags may change it on --resume (how long or how a run runs, never what it
    computes per step); `const` = (value, metavar) makes a switch with an optional value (timm's
    `--torchcompile [BACKEND]`): false (no, off, null) is off, true (yes, on) or the bare flag is
    `value`, else a name."""
    meta = {"help": help, "choices": choices, "aliases": tuple(aliases), "items": items or (int, "+", None),
            "resumable": resumable, "const": const}
    return dataclasses.field(default=default, metadata=meta)


def flag_name(name: str) -> str:
    """The command-line flag of field `name` (`model_ema` -> `--model-ema`)."""
    return "--" + name.replace("_", "-")


class FieldError(ConfigError):
    """A bad value of one field; the message names its flag (`--model-ema must ...`)."""

    def __init__(self, name: str, problem: str):
        self.field, self.problem = name, problem
        super().__init__(f"{flag_name(name)} {problem}")


def require(ok: bool, name: str, what: str, value: Any) -> None:
    """FieldError for field `name` unless `ok`; `value` is shown unless a switch or unset."""
    if not ok:
        raise FieldError(name, what if isinstance(value, bool) or value is None else f"{what}, got {value!r}")


class Section:
    """Base of the config sections: `check()` validates the section's own fields (FieldError
    naming the first bad one; the choices first)."""

    def check(self) -> None:
        for f in dataclasses.fields(self):
            choices, value = f.metadata["choices"], getattr(self, f.name)
            if choices is not None and value is not None:  # None: coerce let it through an optional type
                require(value in choices, f.name, f"must be one of {', '.join(choices)}", value)


# The words a switch with an optional value reads as off or on rather than as a name.
SWITCH_WORDS = {"false": False, "no": False, "off": False, "none": None, "null": None, "true": True, "yes": True,
                "on": True}


def coerce(f: dataclasses.Field, value: Any) -> Any:
    """One value checked and converted against field `f`'s annotation (kept as a string)."""
    name, type_str = f.name, str(f.type)
    if name == "mask_loss_anneal" and isinstance(value, bool):  # a boolean reads as none / cosine
        value = "cosine" if value else "none"
    if f.metadata["const"] is not None:  # a switch with an optional value: false (null: off too), true, a name
        if isinstance(value, str) and value.lower() in SWITCH_WORDS:  # `--torchcompile false` on the command line
            value = SWITCH_WORDS[value.lower()]
        if value is None or isinstance(value, bool):
            return f.metadata["const"][0] if value else False
        if isinstance(value, str) and value:
            return value
        raise FieldError(name, f"must be false, true or a name, got {value!r}")
    if value is None:
        if "None" in type_str:
            return None
        raise FieldError(name, "must not be empty")
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
        if not math.isfinite(value):  # no field has a use for nan or infinity
            raise FieldError(name, f"must be a finite number, got {value!r}")
        return float(value)
    if base == "str":
        if not isinstance(value, str):
            raise FieldError(name, f"must be a string, got {value!r}")
        return value
    if base == "list":
        if not isinstance(value, (list, tuple)):
            raise FieldError(name, f"must be a list, got {value!r}")
        if f.metadata["items"][0] is float:
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value):
                raise FieldError(name, f"must be a list of finite numbers, got {value!r}")
            return [float(v) for v in value]
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise FieldError(name, f"must be a list of integers, got {value!r}")
        return list(value)
    return value
