"""Validated settings: the one base class of every settings type, and the one way their errors read.

Each concept has one pydantic type (LoraSettings, MemorySettings, DataSettings, the recipe's sections),
used by the recipe and by the Python API alike. Types are strict: a value must already have the field's
type (`rank: true` is not 1, `packing: "yes"` is not true, a quoted "1e-3" is not a number), except that
an integer is a valid float; and a float must be finite (no .inf or .nan). A validation error becomes one line naming the key path
(`lora.rank: input should be greater than 0 (got 0)`), with a did-you-mean for unknown keys, prefixed by
where the value came from (`recipe.yaml:12`) when that is known.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from gptoss_tune.errors import UserError


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True, allow_inf_nan=False)

    @classmethod
    def coerce(cls, value: Any, where: str):
        """An instance, or a dict of its fields, validated; anything else is a one-line UserError.
        `where` names the argument in messages (e.g. "lora")."""
        if isinstance(value, cls):
            return value  # validated when built, and on every assignment since
        if isinstance(value, dict):
            try:
                return cls.model_validate(value)
            except ValidationError as e:
                raise UserError(first_error(e, cls, lambda loc: "", prefix=(where,))) from None
        raise UserError(f"{where} must be a {cls.__name__} or a dict, got {type(value).__name__}")


def section_class(root: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The settings type at key path `loc` under `root` (None where the path leaves the settings types)."""
    cls: Any = root
    for part in loc:
        field = cls.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            return None
        ann = field.annotation
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        cls = ann
    return cls


def did_you_mean(root: type[BaseModel], key: str, loc: tuple, prefix: tuple = ()) -> str:
    cls = section_class(root, loc)
    if cls is None:
        return ""
    known = list(cls.model_fields)
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    path = ".".join(str(p) for p in prefix + loc)
    if close:
        return f"; did you mean '{path + '.' if path else ''}{close[0]}'?"
    return f"; known keys{' under ' + path if path else ''}: {', '.join(known)}"


def _short(value: Any) -> str:
    s = repr(value)
    return s if len(s) <= 60 else s[:57] + "..."


def _describe(root: type[BaseModel], loc: tuple) -> str:
    cls = section_class(root, loc[:-1])
    if cls is not None and loc and loc[-1] in cls.model_fields:
        desc = cls.model_fields[loc[-1]].description
        if desc:
            return f" ({desc})"
    return ""


def describe_error(err: dict, root: type[BaseModel], prefix: tuple = ()) -> str:
    """One pydantic error as a line without its source: 'lora.rank: input should be ...'."""
    loc = tuple(err.get("loc", ()))
    path = ".".join(str(p) for p in prefix + loc)
    kind = err.get("type", "")
    if kind == "extra_forbidden":
        return f"unknown key '{path}'{did_you_mean(root, str(loc[-1]), loc[:-1], prefix)}"
    if kind == "missing":
        return f"'{path}' is required{_describe(root, loc)}"
    msg = err.get("msg", "invalid")
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
        return msg if not path or msg.startswith(path.split(".")[0]) else f"{path}: {msg}"
    msg = msg[0].lower() + msg[1:]
    got = f" (got {_short(err['input'])})" if "input" in err and not isinstance(err["input"], dict) else ""
    hint = ""
    if isinstance(err.get("input"), str) and kind in ("int_type", "float_type", "bool_type"):
        hint = (
            "; a quoted value is a string: write "
            + ("true or false" if kind == "bool_type" else "the number")
            + " without quotes"
        )
    return f"{path}: {msg}{got}{hint}"


def first_error(
    e: ValidationError, root: type[BaseModel], source_of: Callable[[tuple], str], prefix: tuple = ()
) -> str:
    """The first error of `e` as one line, prefixed by `source_of(its key path)` when that is not empty,
    and how many more there are."""
    errors = e.errors()
    loc = tuple(errors[0].get("loc", ()))
    line = describe_error(errors[0], root, prefix)
    source = source_of(loc)
    more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
    return (f"{source}: {line}" if source else line) + more
