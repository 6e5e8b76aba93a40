"""Check a config value against its schema type, converting where NeoX files need it.

Accepted conversions: an int for a float; a number written as a string ("3e-4", which YAML 1.1
reads as a string because it has no decimal point) for a float or an int; an integral float
(1.0e+5) for an int; a Literal choice or a registered name in any letter case (NeoX compares
case-insensitively), stored in the schema's or the registry's spelling.
"""

from __future__ import annotations

import math
import re
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

from megatron.neox_arguments import rules

_NUMBER = re.compile(r"^[-+]?(\d[\d_]*\.?[\d_]*|\.\d[\d_]*)([eE][-+]?\d+)?$")


class TypeMismatch(Exception):
    """Raised by `coerce`; the message is the expected type in words, `hint` what may help
    (the closest registered name)."""

    def __init__(self, expected: str, hint: str = "") -> None:
        super().__init__(expected)
        self.hint = hint


@dataclass(frozen=True)
class Registered:
    """Schema marker, ``Annotated[str, Registered("norm")]``: the value names an entry of the
    registry the model (or optimizer, schedule, loss) module registered under that kind with
    `rules.register_names`, so a user's ``register_*`` call is all a new name needs.
    ``refused`` are NeoX names accepted here for validation to explain why they are not
    supported yet."""

    kind: str
    refused: tuple[str, ...] = ()

    def canonical(self, value: str) -> str:
        """``value`` in the registry's spelling; raises TypeMismatch if nobody registered it."""
        registry = rules.names(self.kind)
        if registry is None:  # a launched process: the launcher checked the name
            return value
        names = (*registry, *self.refused)
        if value in names:
            return value
        for name in names:
            if name.lower() == value.lower():
                return name
        raise TypeMismatch(f"one of {registry.choices()}", hint=registry.hint(value))


def parse_number(text: str) -> float | None:
    """The float a numeric string spells, or None."""
    text = text.strip()
    if not _NUMBER.match(text):
        return None
    value = float(text.replace("_", ""))
    return value if math.isfinite(value) else None


def type_name(tp: Any) -> str:
    """The expected type in words, for error messages."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(c) for c in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        names = [type_name(a) for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(names)
    return getattr(tp, "__name__", str(tp))


def coerce(value: Any, tp: Any) -> Any:
    """`value` converted to `tp`; raises TypeMismatch. None is always accepted (unset)."""
    if value is None:
        return None
    origin = typing.get_origin(tp)
    if origin is Literal:
        return _coerce_literal(value, typing.get_args(tp))
    if origin is Annotated:
        base, marker = typing.get_args(tp)
        return marker.canonical(coerce(value, base))
    if origin in (Union, types.UnionType):
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(options) == 1:
            return coerce(value, options[0])
        return _coerce_union(value, options, tp)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        return _coerce_int(value)
    elif tp is float:
        return _coerce_float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is list:
        if isinstance(value, list | tuple):
            return list(value)
    elif tp is dict:
        if isinstance(value, dict):
            return value
    else:
        raise TypeError(f"schema type {tp!r} is not supported by the type checker")
    raise TypeMismatch(type_name(tp))


def _coerce_int(value: Any) -> int:
    if isinstance(value, bool):
        raise TypeMismatch("int")
    if isinstance(value, int):
        return value
    number = parse_number(value) if isinstance(value, str) else value
    if isinstance(number, float) and number.is_integer():
        return int(number)
    raise TypeMismatch("int")


def _coerce_float(value: Any) -> float:
    if isinstance(value, bool):
        raise TypeMismatch("float")
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        number = parse_number(value)
        if number is not None:
            return number
    raise TypeMismatch("float")


def _coerce_union(value: Any, options: list[Any], tp: Any) -> Any:
    # int | float: keep ints as ints, everything else numeric becomes a float.
    if set(options) == {int, float}:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        return _coerce_float(value)
    for option in options:
        try:
            return coerce(value, option)
        except TypeMismatch:
            continue
    raise TypeMismatch(type_name(tp))


def _coerce_literal(value: Any, choices: tuple[Any, ...]) -> Any:
    if value in choices and type(value) in {type(c) for c in choices}:
        return value
    if isinstance(value, str):
        for choice in choices:
            if isinstance(choice, str) and choice.lower() == value.lower():
                return choice
    raise TypeMismatch("one of " + ", ".join(repr(c) for c in choices))


def convert_numeric_strings(value: Any) -> Any:
    """Inside nested dicts/lists (optimizer params, DeepSpeed sections), turn "3e-4"-style
    strings into numbers, since YAML 1.1 reads exponent notation without a dot as a string."""
    if isinstance(value, dict):
        return {k: convert_numeric_strings(v) for k, v in value.items()}
    if isinstance(value, list):
        return [convert_numeric_strings(v) for v in value]
    if isinstance(value, str) and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+", value):
        mantissa, _, exponent = value.lower().partition("e")
        # "5e8" (a bucket size) stays an int; "3e-4" and "1.0e8" are floats.
        if "." not in mantissa and not exponent.startswith("-"):
            return int(float(value))
        return float(value)
    return value
