"""Typed run configuration for every command: YAML files plus ``key=value`` dot-list overrides, validated against
dataclasses.

Each command has one dataclass (next to the recipe it configures). A run's config is composed in this order: the
dataclass defaults, the YAML file (``_base_: other.yaml`` inherits), the ``key=value`` overrides; then
``${section.key}`` interpolations are resolved and the result is checked against the dataclass: an unknown key is a
ConfigError with the close match, a value of the wrong type names the field and what it expects. The effective config
is saved atomically next to the run (:func:`save_yaml`).

OmegaConf (as DinoV2 uses it) does the mechanics it is good at: the dot-list value grammar (``1e-3`` is a number,
``[0.9,0.95]`` a list) and ``${...}`` interpolation. The typed check stays here, because OmegaConf structured configs
reject ``Literal`` fields and ``X | None`` unions, which the configs use throughout, and their errors do not suggest
the close match. Configs never execute code (YAML safe loading only).
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from explora.core.errors import ConfigError
from explora.core.io import atomic_write_bytes

T = TypeVar("T")


def _suggest(key: str, options: list[str]) -> str:
    close = difflib.get_close_matches(key, options, n=1, cutoff=0.5)
    return f" Did you mean '{close[0]}'?" if close else f" Valid keys: {', '.join(sorted(options))}."


def type_name(tp: Any) -> str:
    if typing.get_origin(tp) is not None or not isinstance(tp, type):
        return str(tp).replace("typing.", "")
    return tp.__name__


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; convert where YAML/CLI gives a compatible form."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        options = [arg for arg in args if arg is not type(None)]
        for arg in options:
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        if len(options) == 1 and options[0] in (int, float, str, bool):  # e.g. int | None: "an integer or null"
            raise ConfigError(errors[0].rstrip(".") + (" or null." if type(None) in args else "."))
        raise ConfigError(f"{where}: got {value!r}, expected {type_name(tp)}.")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(
                f"{where}: got {value!r}, expected one of {list(args)}." + _suggest(str(value), [str(a) for a in args])
            )
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(tp, type) and isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a section (mapping) of {tp.__name__}, got {value!r}.")
        return from_dict(tp, value, where)
    if origin in (list, tuple):
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: got {value!r}, expected a list.")
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: got {value!r}, expected a mapping.")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: got {value!r}, expected true or false.")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: got {value!r}, expected an integer.")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where}: got {value!r}, expected a number.")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: got {value!r}, expected a string.")
    return value


def section(default_factory: Any, read: Any = None) -> Any:
    """A dataclass field holding a config section (``default_factory`` None: the section defaults to null);
    ``read(mapping, default, where)`` builds it from YAML instead of :func:`from_dict` (e.g. the ExPLoRA spec, whose
    ``preset`` key supplies the defaults of the other keys)."""
    metadata = {"read": read} if read else {}
    if default_factory is None:
        return dataclasses.field(default=None, metadata=metadata)
    return dataclasses.field(default_factory=default_factory, metadata=metadata)


def from_dict(cls: type[T], data: dict[str, Any], where: str = "config") -> T:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys (with a suggestion) and wrong types."""
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(f"{where}: unknown key '{key}'." + _suggest(key, list(fields)))
        read = fields[key].metadata.get("read")
        if read is not None and isinstance(value, dict):
            kwargs[key] = read(value, _default(fields[key]), f"{where}.{key}")
        else:
            kwargs[key] = _coerce(value, hints[key], f"{where}.{key}")
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def to_dict(obj: Any) -> Any:
    """Dataclass -> plain YAML-serialisable structure (tuples become lists); fields marked ``derived`` (filled in by
    the code, not settings) are left out."""
    if dataclasses.is_dataclass(obj):
        return {
            f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if not f.metadata.get("derived")
        }
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (['a','b','c'], parsed value); the value is parsed as YAML (numbers, lists, null)."""
    if "=" not in item:
        raise ConfigError(f"override '{item}': expected KEY=VALUE, e.g. train.steps=100.")
    key, raw = item.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{item}': the key '{key}' is not a dotted name like optim.lr.")
    return key.split("."), parse_value(raw)


def parse_value(raw: str) -> Any:
    """A command-line value in OmegaConf's grammar (YAML plus ``1e-3`` as a number); ``""`` stays the empty string,
    ``${...}`` interpolations are kept for :func:`resolve`."""
    if raw == "":
        return ""
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist([f"value={raw}"]), resolve=False)["value"]
    except (OmegaConfBaseException, yaml.YAMLError, ValueError):
        return raw


def resolve(data: dict[str, Any], where: str = "config") -> dict[str, Any]:
    """Resolve ``${section.key}`` interpolations (OmegaConf) in a composed config."""
    try:
        return OmegaConf.to_container(OmegaConf.create(data), resolve=True)  # type: ignore[return-value]
    except OmegaConfBaseException as e:
        raise ConfigError(f"{where}: {str(e).splitlines()[0]}") from None


def compose(
    cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None, where: str = "config"
) -> T:
    """Defaults of ``cls`` <- YAML file ``path`` (optional) <- ``key=value`` overrides, resolved and validated."""
    data = load_yaml(path) if path else {}
    return from_dict(cls, resolve(merge_overrides(data, overrides or []), where), where)


def merge_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply dot-list overrides to a nested mapping (creating sections as needed)."""
    out = _deep_copy(data)
    for item in overrides:
        path, value = parse_override(item)
        node = out
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override '{item}': '{part}' is a value, not a section.")
            node = child
        node[path[-1]] = value
    return out


def _deep_copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; ``_base_: other.yaml`` (relative to the file) inherits from another config."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist.")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping at the top level, got {type(data).__name__}.")
    base = data.pop("_base_", None)
    if base:
        parent = load_yaml(path.parent / base)
        data = deep_merge(parent, data)
    return data


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = _deep_copy(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = _deep_copy(v)
    return out


def save_yaml(obj: Any, path: str | Path) -> None:
    """Write the effective config (a dataclass or mapping) as YAML, atomically: ``--resume`` re-reads it, so a kill
    mid-write must leave the old file or the new one."""
    atomic_write_bytes(path, yaml.safe_dump(to_dict(obj), sort_keys=False).encode())


def field_docs(cls: type) -> dict[str, str]:
    """``{field: help}`` from the ``# comment`` after each field of dataclass ``cls`` and its bases (for generated
    ``--help``); empty where the source is not available."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__[:-1]):
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        for line in source.splitlines():
            m = re.match(r"\s+(\w+)\s*:[^#]*#\s*(.+)$", line)
            if m:
                docs[m.group(1)] = m.group(2).strip()
    return docs


def section_type(tp: Any) -> Any:
    """The dataclass of a section annotation (``Spec`` or ``Spec | None``), else None."""
    if dataclasses.is_dataclass(tp):
        return tp
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(inner) == 1 and dataclasses.is_dataclass(inner[0]):
            return inner[0]
    return None


def describe(cls: type, prefix: str = "", defaults: Any = None) -> list[tuple[str, Any, Any, str]]:
    """Every settable key of dataclass ``cls``, nested sections flattened: ``(dotted key, type, default, help)``;
    the defaults are read from the instance ``defaults`` when given (a section's own default)."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    out = []
    for f in dataclasses.fields(cls):
        if f.metadata.get("derived"):
            continue
        tp = hints[f.name]
        default = getattr(defaults, f.name) if defaults is not None else _default(f)
        inner = section_type(tp)
        if inner is not None:
            out.extend(describe(inner, f"{prefix}{f.name}.", default))
        else:
            out.append((f"{prefix}{f.name}", tp, to_dict(default), docs.get(f.name, "")))
    return out
