"""One way to declare settings: a dataclass whose fields become click options.

``harness bench`` (its run, timing and speed settings), every sampler and metric (their ``Options`` class)
and every trainer (its ``config_class``) declare settings the same way: a dataclass field made with
:func:`setting`, carrying its default, help text and constraints. :func:`click_options` turns each field
into one click option with both spellings (``--num_images`` and ``--num-images``), so every default has one
source and plugins read typed values (``self.options.ddim_eta``).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

import click


@dataclasses.dataclass(frozen=True)
class Options:
    """Base class of a sampler's or metric's own settings (a frozen dataclass of :func:`setting` fields)."""


OptionsT = TypeVar("OptionsT")


def setting(default: Any, help: str, *, aliases: tuple[str, ...] = (), choices: tuple[str, ...] | None = None,
            minimum: float | None = None, maximum: float | None = None, flags: tuple[str, ...] = (),
            metavar: str | None = None) -> Any:
    """A settings field with what its command-line option needs.

    ``aliases`` are extra names, spelt both ways like the field's (``grad_accum``); ``flags`` replace the
    generated flags altogether (``("--sampler", "-s")``, ``("--fuse/--no-fuse",)``); ``choices`` limit a
    string; ``minimum`` / ``maximum`` bound a number. A ``tuple[...]`` field takes several values after one
    flag (``--steps 2 4 8``) or a repeated flag.
    """
    metadata = {"help": help, "aliases": aliases, "choices": choices, "minimum": minimum, "maximum": maximum,
                "flags": flags, "metavar": metavar}
    return dataclasses.field(default=default, metadata=metadata)


def spellings(name: str) -> tuple[str, ...]:
    """Both the click-style and the seed's spelling: ("--num-images", "--num_images")."""
    dashed = "--" + name.replace("_", "-")
    return (dashed,) if "_" not in name else (dashed, "--" + name)


def field_specs(options_class: type) -> list[tuple[dataclasses.Field[Any], type, bool]]:
    """(field, value type, takes several values) for each field of a settings class, in declaration order."""
    hints = typing.get_type_hints(options_class)
    specs = []
    for field in dataclasses.fields(options_class):
        kind, many = _value_type(hints[field.name])
        specs.append((field, kind, many))
    return specs


def _value_type(hint: Any) -> tuple[type, bool]:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is tuple:
        return args[0], True
    if origin in (typing.Union, types.UnionType):  # Optional[X], X | None
        (inner,) = [arg for arg in args if arg is not type(None)]
        return _value_type(inner)
    return hint, False


def flags_of(field: dataclasses.Field[Any]) -> list[str]:
    """The command-line flags of a field: its own ``flags``, or its name and aliases spelt both ways.

    A switch that is on by default also gets its off flag (``--zero-terminal-snr/--no-zero-terminal-snr``):
    without one it could never be turned off.
    """
    metadata = field.metadata
    if metadata.get("flags"):
        return list(metadata["flags"])
    names = [field.name, *metadata.get("aliases", ())]
    if field.default is True:
        return [f"{flag}/--no{'_' if '_' in flag else '-'}{flag[2:]}" for name in names for flag in spellings(name)]
    return [flag for name in names for flag in spellings(name)]


def click_options(options_class: type) -> list[click.Option]:
    """One click option per field of ``options_class``; the option's parameter name is the field's name."""
    params = []
    for field, kind, many in field_specs(options_class):
        metadata = field.metadata
        default = field.default if field.default is not dataclasses.MISSING else None
        shown_default = not (default is None or default is False or default == ())
        params.append(click.Option(
            [*flags_of(field), field.name], type=_click_type(kind, metadata), multiple=many,
            is_flag=kind is bool, default=default, show_default=shown_default, help=metadata.get("help", ""),
            metavar=metadata.get("metavar"),
        ))
    return params


def multi_value_flags(options_class: type) -> list[str]:
    """The flags of the fields that take several values after one flag (``--steps 2 4 8``)."""
    return [flag for field, _, many in field_specs(options_class) if many for flag in flags_of(field)]


def _click_type(kind: type, metadata: Mapping[str, Any]) -> Any:
    if metadata.get("choices"):
        return click.Choice(metadata["choices"])
    low, high = metadata.get("minimum"), metadata.get("maximum")
    if kind is int:
        return click.IntRange(min=low, max=high) if low is not None or high is not None else int
    if kind is float:
        return FiniteFloat(min=low, max=high)
    return kind


class FiniteFloat(click.FloatRange):
    """The type of every float option: click's FloatRange, refusing NaN and inf where the value is parsed.

    NaN passes every bound and inf every lower one, yet no harness setting means anything there: a NaN or inf
    learning rate trains an all-NaN LoRA, an inf guidance a NaN image, an inf --min_time never ends.
    """

    name = "float"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value} is not a finite number; {_finite_example(param)}.", param, ctx)
        return super().convert(number, param, ctx)

    def _describe_range(self) -> str:
        # click shows a range in the help whenever the type is one; an unbounded float has none to show.
        return "" if self.min is None and self.max is None else super()._describe_range()


def _finite_example(param: click.Parameter | None) -> str:
    default, which = (param.default if param is not None else None), "the default"
    if isinstance(default, tuple) and default:
        default, which = default[0], "the first default"
    if isinstance(default, (int, float)) and math.isfinite(default):
        return f"pass e.g. {default:g} ({which})"
    return "pass a finite one"


def build(options_class: type[OptionsT], values: Mapping[str, Any]) -> OptionsT:
    """An instance of ``options_class`` from parsed option values (keyed by field name; others ignored)."""
    names = {field.name for field in dataclasses.fields(options_class)}  # type: ignore[arg-type]
    return options_class(**{name: value for name, value in values.items() if name in names})
