"""One strict-settings helper for every settings file of the project (base: both wings may import it).

Two kinds of settings share the checks and the messages here:

- frozen dataclasses (the loader's ``LoaderSettings``), checked field by field by
  :func:`check_fields` whether they were built from a dict (:func:`build_dataclass`) or directly
  in Python;
- pydantic models (the manifest, the training config, the Dask cluster file), which derive from
  :class:`SettingsModel` (strict types, unknown keys refused, frozen) and whose
  ``ValidationError`` :func:`format_validation_error` turns into the same messages.

Either way an unknown key names the keys that exist and the closest one (did you mean), a bool is
never read from a string or a number (``'no'``, ``'yes'``, ``0`` and ``1`` are refused, not taken
as true or false), and every message names the key path in one shape,
``<file>: <key path> must be <what>, not <value>``. YAML settings files are read with
:func:`load_yaml`: duplicate keys are refused, ``1e-4`` is a number and ``yes`` a string, as in YAML 1.2.

>>> did_you_mean("batchsize", ["batch_size", "seed"])
" (did you mean 'batch_size'?)"
>>> type_message("genes.niche", ["true or false"], "yes")
"genes.niche must be true or false, not 'yes'"
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import re
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Final, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

T = TypeVar("T")

#: Raised by the helpers; each caller passes its own subclass of the project's errors.
ErrorFactory = Callable[[str], Exception]


def did_you_mean(word: object, known: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest known key, or ``""`` when none is close."""
    close = difflib.get_close_matches(str(word), list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def unknown_keys_message(unknown: Sequence[object], known: Sequence[str], *, where: str = "") -> str:
    """``unknown key(s) in genes: x (did you mean 'y'?); known: a, b`` for one mapping of settings."""
    hints = "".join(did_you_mean(key, known) for key in unknown[:1])
    place = f" in {where.rstrip('.')}" if where.rstrip(".") else ""
    listing = f"; known: {', '.join(known)}" if known else ""
    return f"unknown key(s){place}: {', '.join(map(str, unknown))}{hints}{listing}"


def type_message(path: str, kinds: Sequence[str], value: object) -> str:
    """``genes.niche must be true or false, not 'yes'``: the one wording of a value of the wrong kind."""
    what = kinds[0] if len(kinds) == 1 else f"{', '.join(kinds[:-1])} or {kinds[-1]}"
    return f"{path or 'settings'} must be {what}, not {value!r}"


def one_of(choices: Iterable[object]) -> str:
    """``one of 'a', 'b' or 'c'``, for :func:`type_message`."""
    quoted = [repr(c) for c in choices]
    return "one of " + (quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}")


# --------------------------------------------------------------------------------------------
# frozen dataclasses


def build_dataclass(cls: type[T], data: Mapping[str, Any], *, path: str, error: ErrorFactory) -> T:
    """Build ``cls`` from plain data; nested dataclass fields come from nested mappings.

    Types are checked by ``cls``'s own ``__post_init__`` calling :func:`check_fields`, so a dict
    and a direct constructor call meet the same checks and the same messages.
    """
    if not isinstance(data, Mapping):
        raise error(type_message(path.rstrip("."), ["a mapping"], data))
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


#: What a value of each plain type must be, in the messages.
_KINDS: Final[Mapping[Any, str]] = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def coerce(hint: Any, value: Any, path: str, *, error: ErrorFactory) -> Any:
    """``value`` checked against ``hint`` (strict: no bool from a string or a number)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        if isinstance(value, hint):
            return value
        if isinstance(value, Mapping):
            return build_dataclass(hint, value, path=f"{path}.", error=error)
        raise error(type_message(path, ["a mapping", f"a {hint.__name__}"], value))
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        members = [a for a in args if a is not type(None)]
        for arg in members:
            try:
                return coerce(arg, value, path, error=error)
            except Exception:  # noqa: BLE001, S112 - try the next member; the message below names them all
                continue
        kinds = [_KINDS.get(a, "a list" if typing.get_origin(a) is tuple else str(a)) for a in members]
        raise error(type_message(path, kinds, value))
    if origin is tuple:
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise error(type_message(path, ["a list"], value))
        items = tuple(coerce(args[0], v, f"{path}[{i}]", error=error) for i, v in enumerate(value))
        return value if isinstance(value, tuple) and all(a is b for a, b in zip(items, value, strict=True)) else items
    if hint is bool:
        if not isinstance(value, bool):
            raise error(type_message(path, [_KINDS[bool]], value))
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise error(type_message(path, [_KINDS[int]], value))
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise error(type_message(path, [_KINDS[float]], value))
        return value if isinstance(value, float) else float(value)
    if hint is str:
        if not isinstance(value, str):
            raise error(type_message(path, [_KINDS[str]], value))
        return value
    raise error(f"{path}: unsupported setting type {hint}")


# --------------------------------------------------------------------------------------------
# pydantic models


class SettingsModel(BaseModel):
    """Base of the project's pydantic settings: strict types, unknown keys refused, frozen.

    Strict as :func:`coerce` is: a bool is only ``true``/``false`` (pydantic's lax mode would take
    ``'no'``, ``'yes'``, ``0`` and ``1``), a number is never read from a string, a string never
    from a number; an integer is a valid float. Lists become tuples for tuple fields (YAML and
    JSON have no tuples). Turn its ``ValidationError`` into text with :func:`format_validation_error`.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    @model_validator(mode="before")
    @classmethod
    def _lists_as_tuples(cls, data: Any) -> Any:
        # strict mode takes a tuple only from a tuple
        names = _tuple_fields(cls)
        if not isinstance(data, Mapping) or not any(isinstance(data.get(n), list) for n in names):
            return data
        return {k: tuple(v) if k in names and isinstance(v, list) else v for k, v in data.items()}


@functools.cache
def _tuple_fields(model: type[BaseModel]) -> frozenset[str]:
    def is_tuple(hint: Any) -> bool:
        args = typing.get_args(hint)
        if typing.get_origin(hint) in (typing.Union, types.UnionType):
            return any(is_tuple(a) for a in args)
        return typing.get_origin(hint) is tuple

    return frozenset(name for name, info in model.model_fields.items() if is_tuple(info.annotation))


#: pydantic error types that say a value is of the wrong kind, and what it must be instead.
_PYDANTIC_KINDS: Final[Mapping[str, str]] = {
    "bool_type": _KINDS[bool],
    "bool_parsing": _KINDS[bool],
    "int_type": _KINDS[int],
    "int_parsing": _KINDS[int],
    "int_from_float": _KINDS[int],
    "float_type": _KINDS[float],
    "float_parsing": _KINDS[float],
    "string_type": _KINDS[str],
    "list_type": "a list",
    "tuple_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
}


def format_validation_error(error: ValidationError, *, source: str, raw: Any, model: type[BaseModel]) -> str:
    """One line per fault of ``error`` (raised validating ``raw`` into ``model``), each ``<source>: ...``.

    Key paths are the data's own (``studies[1] (id 'B1').patient``, ``optim.lr``): the names
    pydantic adds for union members and validators are left out. Unknown keys of one mapping
    share a line that lists the known ones with a did-you-mean; wrong kinds at one key share a
    line (``reader.x must be a string, an integer, a number or true or false, not [1]``).
    """
    unknown: dict[tuple[Any, ...], list[str]] = {}
    kinds: dict[tuple[Any, ...], tuple[list[str], Any]] = {}
    order: dict[tuple[Any, ...] | str, None] = {}  # the lines in order: a text, or the key of a group above
    for err in error.errors():
        keys = _data_keys(raw, err["loc"], missing=err["type"] == "missing")
        path = _path_text(raw, keys)
        kind = _PYDANTIC_KINDS.get(err["type"])
        if err["type"] == "literal_error":
            kind = f"one of {err.get('ctx', {}).get('expected', '')}"
        if err["type"] == "extra_forbidden":
            unknown.setdefault(keys[:-1], []).append(str(keys[-1]))
            order.setdefault(("unknown", *keys[:-1]))
        elif kind is not None:
            found, _ = kinds.setdefault(keys, ([], err["input"]))
            if kind not in found:
                found.append(kind)
            order.setdefault(("kind", *keys))
        elif err["type"] == "missing":
            order.setdefault(f"{path} is missing (it is required)")
        elif err["type"] in ("value_error", "assertion_error"):
            message = err["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
            order.setdefault(f"{path}: {message}" if path else message)
        elif err["msg"].startswith("Input should be "):
            order.setdefault(f"{path} {err['msg'].replace('Input should be', 'must be', 1)}, not {err['input']!r}")
        else:
            order.setdefault(f"{path}: {err['msg']} (got {err['input']!r})")
    out: list[str] = []
    for key in order:
        if isinstance(key, str):
            out.append(key)
        elif key[0] == "unknown":
            parent = key[1:]
            known = _known_keys(model, parent)
            out.append(unknown_keys_message(unknown[parent], known, where=_path_text(raw, parent)))
        else:
            found, given = kinds[key[1:]]
            out.append(type_message(_path_text(raw, key[1:]), found, given))
    return "\n".join(f"{source}: {line}" for line in out)


def _data_keys(raw: Any, loc: Sequence[int | str], *, missing: bool) -> tuple[int | str, ...]:
    """The part of a pydantic error location that names the data (union tags and validator names dropped)."""
    keys: list[int | str] = []
    node = raw
    for i, part in enumerate(loc):
        in_mapping = isinstance(node, Mapping) and part in node
        in_list = isinstance(node, (list, tuple)) and isinstance(part, int) and 0 <= part < len(node)
        if in_mapping or in_list:
            keys.append(part)
            node = node[part]
        elif missing and i == len(loc) - 1:
            keys.append(part)
    return tuple(keys)


def _path_text(raw: Any, keys: Sequence[int | str]) -> str:
    """``studies[1] (id 'study-b').defaults.technology``: list entries that have an id are named by it."""
    text = ""
    node = raw
    for key in keys:
        if isinstance(key, int):
            text += f"[{key}]"
            node = node[key] if isinstance(node, (list, tuple)) and 0 <= key < len(node) else None
            if isinstance(node, Mapping) and isinstance(node.get("id"), str):
                text += f" (id {node['id']!r})"
        else:
            text += f".{key}" if text else key
            node = node.get(key) if isinstance(node, Mapping) else None
    return text


def _known_keys(model: type[BaseModel], keys: Sequence[int | str]) -> list[str]:
    """The field names of the model found at ``keys`` below ``model`` (empty when none is)."""
    hint: Any = model
    for key in keys:
        hint = _without_none(hint)
        origin = typing.get_origin(hint)
        if isinstance(hint, type) and issubclass(hint, BaseModel) and isinstance(key, str):
            info = hint.model_fields.get(key)
            if info is None:
                return []
            hint = info.annotation
        elif origin in (dict, Mapping) and isinstance(key, str):
            hint = typing.get_args(hint)[1]
        elif origin in (list, tuple) and isinstance(key, int):
            hint = typing.get_args(hint)[0]
        else:
            return []
    hint = _without_none(hint)
    return list(hint.model_fields) if isinstance(hint, type) and issubclass(hint, BaseModel) else []


def _without_none(hint: Any) -> Any:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(members) == 1:
            return members[0]
    return hint


# --------------------------------------------------------------------------------------------
# YAML


class _SettingsLoader(yaml.SafeLoader):
    """A SafeLoader with YAML 1.2's scalars where 1.1 surprises, and no duplicate keys.

    ``1e-4`` is a number (1.1 wants ``1.0e-4``); only ``true``/``false`` are bools, so ``yes``,
    ``no``, ``on`` and ``off`` stay strings that a bool setting refuses by name (1.1 made them
    bools, and the country code ``NO`` false).
    """


def _construct_mapping(loader: _SettingsLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:  # noqa: FBT001, FBT002
    mapping: dict[Any, Any] = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in mapping:
            raise yaml.constructor.ConstructorError(
                "while reading a mapping", node.start_mark, f"found duplicate key {key!r}", key_node.start_mark
            )
        mapping[key] = loader.construct_object(value_node, deep=deep)
    return mapping


_SettingsLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_BOOL_TAG: Final = "tag:yaml.org,2002:bool"
_SettingsLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _BOOL_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_SettingsLoader.add_implicit_resolver(_BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
# After SafeLoader's own float and int resolvers: only what they leave as a string (1e-4, 2.5e3).
_SettingsLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_yaml(text: str, *, source: str, error: ErrorFactory) -> Any:
    """Parse a YAML settings text read from ``source`` (named in the error when it is not valid YAML).

    >>> load_yaml("lr: 1e-4\\nsteps: 10\\nfast: yes\\nexact: true", source="run.yaml", error=ValueError)
    {'lr': 0.0001, 'steps': 10, 'fast': 'yes', 'exact': True}
    """
    try:
        return yaml.load(text, Loader=_SettingsLoader)  # a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise error(f"{source}: not valid YAML: {exc}") from None
    except RecursionError:
        raise error(f"{source}: YAML nested too deeply to be a settings file") from None


__all__ = [
    "ErrorFactory",
    "SettingsModel",
    "build_dataclass",
    "check_fields",
    "coerce",
    "did_you_mean",
    "format_validation_error",
    "load_yaml",
    "one_of",
    "type_message",
    "unknown_keys_message",
]
