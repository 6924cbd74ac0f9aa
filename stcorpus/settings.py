"""One strict-settings helper for every settings file of the project (base: both wings may import it).

Frozen dataclasses (the loader's ``LoaderSettings``) are checked field by field by
:func:`check_fields` whether they were built from a dict (:func:`build_dataclass`) or directly in
Python. An unknown key names the keys that exist and the closest one (did you mean), a bool is
never read from a string (``'no'`` is refused, not taken as true), and every message names the key
path. The manifest, the training config and the Dask cluster file are pydantic models that still
format their own errors: moving them here is open work (issue 15.6).

>>> did_you_mean("batchsize", ["batch_size", "seed"])
" (did you mean 'batch_size'?)"
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

T = TypeVar("T")

#: Raised by the helpers; each caller passes its own subclass of the project's errors.
ErrorFactory = Callable[[str], Exception]


def did_you_mean(word: object, known: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest known key, or ``""`` when none is close."""
    close = difflib.get_close_matches(str(word), list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def unknown_keys_message(unknown: Sequence[object], known: Sequence[str], *, where: str = "") -> str:
    """``unknown setting(s) in genes.: x (did you mean 'y'?); known: a, b`` for a dataclass section."""
    hints = "".join(did_you_mean(key, known) for key in unknown[:1])
    place = f" in {where}" if where else ""
    return f"unknown setting(s){place.rstrip('.')}: {', '.join(map(str, unknown))}{hints}; known: {', '.join(known)}"


# --------------------------------------------------------------------------------------------
# frozen dataclasses


def build_dataclass(cls: type[T], data: Mapping[str, Any], *, path: str, error: ErrorFactory) -> T:
    """Build ``cls`` from plain data; nested dataclass fields come from nested mappings.

    Types are checked by ``cls``'s own ``__post_init__`` calling :func:`check_fields`, so a dict
    and a direct constructor call meet the same checks and the same messages.
    """
    if not isinstance(data, Mapping):
        raise error(f"{path.rstrip('.') or 'settings'} must be a mapping, not {type(data).__name__}")
    if not (dataclasses.is_dataclass(cls) and isinstance(cls, type)):
        raise TypeError(f"{cls!r} is not a dataclass")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted((k for k in data if k not in names), key=str)
    if unknown:
        raise error(unknown_keys_message(unknown, names, where=path))
    kwargs: dict[str, Any] = {}
    for name in names:
        if name not in data:
            continue
        value = data[name]
        hint = hints[name]
        if dataclasses.is_dataclass(hint) and isinstance(hint, type) and not isinstance(value, hint):
            value = build_dataclass(hint, value, path=f"{path}{name}.", error=error)
        kwargs[name] = value
    result: T = cls(**kwargs)
    return result


def check_fields(instance: Any, *, path: str, error: ErrorFactory) -> None:
    """Check every field of a frozen dataclass against its annotation, normalising in place.

    Lists become tuples, ints given for floats become floats; a wrong type raises ``error`` naming
    ``path + field``. Call it first in ``__post_init__``.
    """
    hints = typing.get_type_hints(type(instance))
    for f in dataclasses.fields(instance):
        value = getattr(instance, f.name)
        checked = coerce(hints[f.name], value, f"{path}{f.name}", error=error)
        if checked is not value:
            object.__setattr__(instance, f.name, checked)


def coerce(hint: Any, value: Any, path: str, *, error: ErrorFactory) -> Any:
    """``value`` checked against ``hint`` (strict: no bool from a string or a number)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        if isinstance(value, hint):
            return value
        if isinstance(value, Mapping):
            return build_dataclass(hint, value, path=f"{path}.", error=error)
        raise error(f"{path} must be a mapping or a {hint.__name__}, not {value!r}")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(arg, value, path, error=error)
            except Exception:  # noqa: BLE001, S112 - try the next member; the message below names them all
                continue
        raise error(f"{path}: {value!r} fits none of {hint}")
    if origin is tuple:
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise error(f"{path} must be a list, not {value!r}")
        items = tuple(coerce(args[0], v, f"{path}[{i}]", error=error) for i, v in enumerate(value))
        return value if isinstance(value, tuple) and all(a is b for a, b in zip(items, value, strict=True)) else items
    if hint is bool:
        if not isinstance(value, bool):
            raise error(f"{path} must be true or false, not {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise error(f"{path} must be an integer, not {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise error(f"{path} must be a number, not {value!r}")
        return value if isinstance(value, float) else float(value)
    if hint is str:
        if not isinstance(value, str):
            raise error(f"{path} must be a string, not {value!r}")
        return value
    raise error(f"{path}: unsupported setting type {hint}")
