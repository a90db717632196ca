"""CLI flags generated from settings classes, so that every setting is reachable from the command line with the
same name, meaning and default as in a recipe (``--window`` is ``convert.window``).

:func:`settings_flags` decorates a Typer verb: for every field of the given settings classes it adds an option
``--field-name`` (help = the field's docstring and default, taken from the class; the flag itself defaults to
"not given"), and passes the verb the flags that were given as ``overrides: dict[field, value]``. The verb
validates them with the class, so types, bounds and error messages are the class's own::

    @app.command()
    @settings_flags(ConvertConfig, ModelSpec, exclude={"source"})
    def convert(model: str = typer.Argument(...), *, overrides: dict) -> None:
        cfg = ConvertConfig(**overrides_for(ConvertConfig, overrides))

List fields take comma-separated values (``--softmax-layers 0,1,8-11``); ``Literal`` fields list their choices; a
bool field is ``--field-name`` (True) or ``--no-field-name`` (False).
"""

from __future__ import annotations

import functools
import inspect
from types import UnionType
from typing import Any, Callable, Literal, Optional, Union, get_args, get_origin, get_type_hints

import typer
from pydantic import BaseModel

from linearize.errors import ConfigError


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def _unwrap_optional(ann: Any) -> Any:
    """``X | None`` -> ``X``; a union with a list (``str | list[str]``) -> the list (the flag takes commas)."""
    if get_origin(ann) in (Union, UnionType):
        args = [a for a in get_args(ann) if a is not type(None)]
        lists = [a for a in args if get_origin(a) is list]
        return args[0] if len(args) == 1 else lists[0] if lists else str
    return ann


def _cli_type(ann: Any) -> type:
    """The type Typer parses the flag's text as; lists and choices arrive as text and are parsed here."""
    ann = _unwrap_optional(ann)
    if ann in (int, float, bool):
        return ann
    return str


def _parse(ann: Any, text: Any, field: str) -> Any:
    """The flag's value in the field's terms (lists from comma-separated text, ranges ``a-b`` for int lists)."""
    inner = _unwrap_optional(ann)
    if get_origin(inner) is list and isinstance(text, str):
        (item,) = get_args(inner) or (str,)
        parts = [p.strip() for p in text.split(",") if p.strip()]
        if item is int:
            out: list[int] = []
            for part in parts:
                try:
                    if "-" in part[1:]:
                        a, b = part.split("-", 1)
                        out.extend(range(int(a), int(b) + 1))
                    else:
                        out.append(int(part))
                except ValueError:
                    raise ConfigError(f"{flag_name(field)} {text!r}: use indices like '0,1,15' or ranges like "
                                      "'0-3'") from None
            return out
        return parts
    if isinstance(text, str) and text.lower() in ("none", "null") and get_origin(ann) in (Union, UnionType):
        return None
    return text


def _help(field_info, ann: Any) -> str:
    doc = " ".join((field_info.description or "").split())
    inner = _unwrap_optional(ann)
    if get_origin(inner) is Literal:
        doc = f"{doc} Choices: {', '.join(map(str, get_args(inner)))}."
    default = field_info.get_default(call_default_factory=True)
    if isinstance(default, list):
        default = ",".join(map(str, default)) or "none"
    return f"{doc} (default: {default})"


def settings_flags(*classes: type[BaseModel], exclude: set[str] | frozenset[str] = frozenset(),
                   panel: str | None = None) -> Callable[[Callable], Callable]:
    """Decorator adding one ``--flag`` per field of ``classes`` (first class wins a shared name) to a Typer verb,
    which receives the given ones as ``overrides``. Nested settings (a field that is itself a model) are skipped:
    recipes reach them (``--set``)."""
    fields: dict[str, tuple[Any, Any]] = {}
    for cls in classes:
        for name, info in cls.model_fields.items():
            ann = info.annotation
            if name in exclude or name in fields:
                continue
            if isinstance(_unwrap_optional(ann), type) and issubclass(_unwrap_optional(ann), BaseModel):
                continue
            fields[name] = (ann, info)

    def decorate(verb: Callable) -> Callable:
        sig = inspect.signature(verb)
        hints = get_type_hints(verb)  # the verb's own annotations, resolved in its module
        own = [p.replace(annotation=hints.get(p.name, p.annotation)) for p in sig.parameters.values()
               if p.name != "overrides"]
        taken = {p.name for p in own}
        extra = []
        for name, (ann, info) in fields.items():
            if name in taken:
                continue
            cli_type = _cli_type(ann)
            decls = flag_name(name)
            if cli_type is bool:  # --flag sets True, --no-flag False (a recipe's or a null default's choice undone)
                decls = f"{decls}/--no-{decls[2:]}"
            opt = typer.Option(None, decls, help=_help(info, ann), show_default=False, rich_help_panel=panel)
            extra.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=opt,
                                           annotation=Optional[cli_type]))

        @functools.wraps(verb)
        def wrapper(*args, **kwargs):
            overrides = {}
            for name, (ann, _) in fields.items():
                if name in taken:
                    continue
                value = kwargs.pop(name, None)
                if value is not None:
                    overrides[name] = _parse(ann, value, name)
            return verb(*args, overrides=overrides, **kwargs)

        params = own + extra
        params.sort(key=lambda p: p.kind)  # positional-or-keyword first, then keyword-only
        wrapper.__signature__ = sig.replace(parameters=params, return_annotation=None)
        wrapper.__annotations__ = {p.name: p.annotation for p in params}
        del wrapper.__wrapped__  # Typer must read the new signature, not the verb's
        return wrapper

    return decorate


def overrides_for(cls: type[BaseModel], overrides: dict[str, Any]) -> dict[str, Any]:
    """The part of ``overrides`` that names fields of ``cls``."""
    return {k: v for k, v in overrides.items() if k in cls.model_fields}


__all__ = ["flag_name", "overrides_for", "settings_flags"]
