"""Typed values to JSON and back: dataclasses of plain fields, checked field by field on the way in.

:func:`to_plain` turns a dataclass tree into JSON-ready values; :func:`from_plain` builds it back from parsed
JSON, raising a :class:`~harness.errors.RecordError` that names the field and what is wrong. A class steers
both with two class attributes: ``json_flat`` (fields whose own fields sit beside the class's in the JSON)
and ``json_omit_none`` (leave out fields that are None).
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import types
import typing
from typing import Any, Union

from harness.errors import RecordError


def fits_float(value: float) -> bool:
    """Whether a JSON number is a finite float or a whole number that converts to one: readers divide and plot them.

    (``math.isfinite`` raises OverflowError on a whole number beyond the float range.)"""
    return abs(value) <= sys.float_info.max


def to_plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        # A class may leave out its fields that are None (Memory holds only the figures its device has).
        omit_none = getattr(type(value), "json_omit_none", False)
        return {f.name: to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)
                if not (omit_none and getattr(value, f.name) is None)}
    if isinstance(value, (list, tuple)):
        return [to_plain(item) for item in value]
    if isinstance(value, dict):
        return {key: to_plain(item) for key, item in value.items()}
    return value


def from_plain(kind: Any, value: Any, where: str) -> Any:
    """``value`` (parsed JSON) as ``kind``, or RecordError naming ``where`` and what is wrong."""
    origin = typing.get_origin(kind)
    if kind is Any:
        return value
    if origin in (Union, types.UnionType):
        options = typing.get_args(kind)
        if value is None and type(None) in options:
            return None
        (inner,) = [option for option in options if option is not type(None)]
        return from_plain(inner, value, where)
    if dataclasses.is_dataclass(kind):
        return _convert_dataclass(kind, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise wrong(where, "a list", value)
        (item,) = typing.get_args(kind)
        return [from_plain(item, element, f"{where}[{index}]") for index, element in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise wrong(where, "an object", value)
        _, item = typing.get_args(kind)
        return {key: from_plain(item, element, f"{where}.{key}") for key, element in value.items()}
    if kind is bool:
        if not isinstance(value, bool):
            raise wrong(where, "true or false", value)
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise wrong(where, "a whole number", value)
        if not fits_float(value):
            raise wrong(where, "a whole number between -1.8e308 and 1.8e308", value)
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not fits_float(value):
            raise wrong(where, "a finite number", value)
        return float(value)
    if kind is str:
        if not isinstance(value, str):
            raise wrong(where, "text", value)
        return value
    raise TypeError(f"no JSON conversion for {kind!r}")


@functools.cache
def _type_hints(kind: type) -> dict[str, Any]:
    """A record class's resolved field types; resolving them is slow and every record of a file needs them."""
    return typing.get_type_hints(kind)


def _convert_dataclass(kind: Any, value: Any, where: str) -> Any:
    if not isinstance(value, dict):
        raise wrong(where or kind.__name__, "an object", value)
    hints = _type_hints(kind)
    arguments = {}
    for f in dataclasses.fields(kind):
        # A field the class declares flat sits beside the class's own in the JSON (a record's measured
        # figures), so its fields are named without a prefix.
        flat = f.name in getattr(kind, "json_flat", ())
        path = where if flat else f"{where}.{f.name}" if where else f.name
        if f.name in value:
            arguments[f.name] = from_plain(hints[f.name], value[f.name], path)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise RecordError(f"'{path}' is missing")
    return kind(**arguments)


def wrong(where: str, expected: str, value: Any) -> RecordError:
    return RecordError(f"'{where}' should be {expected}, not {shown(value)}")


def shown(value: Any) -> str:
    shown = repr(value)
    return shown if len(shown) <= 40 else shown[:37] + "..."
