"""Command-line arguments generated from a command's config dataclass: one configuration system for every command.

Every command is configured the same way: ``--config FILE_OR_PRESET`` (YAML), then ``--flag VALUE`` for the
dataclass's own fields (``--batch-size 64`` sets ``batch_size``), then ``key=value`` dot-list overrides for any key,
nested ones included (``train.steps=100``). The flags and the ``--help`` text come from the dataclass fields and
their ``# comments`` (:func:`explora.core.config.describe`); nothing is mirrored by hand, so a new field is a new flag.
Values are checked by :func:`explora.core.config.from_dict` (unknown keys: the did-you-mean ConfigError).
"""

from __future__ import annotations

import argparse
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from explora.core.config import (
    describe,
    from_dict,
    load_yaml,
    merge_overrides,
    parse_value,
    resolve,
    section_type,
    type_name,
)

T = TypeVar("T")
_DEST = "cfg__"


def _is_list(tp: Any) -> bool:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return any(_is_list(a) for a in typing.get_args(tp) if a is not type(None))
    return typing.get_origin(tp) in (list, tuple)


def _is_bool(tp: Any) -> bool:
    return tp is bool or (typing.get_origin(tp) in (typing.Union, types.UnionType) and bool in typing.get_args(tp))


def _is_str(tp: Any) -> bool:
    return tp is str or (typing.get_origin(tp) in (typing.Union, types.UnionType) and str in typing.get_args(tp))


def _flag_fields(cls: type, flatten: tuple[str, ...]) -> list[tuple[str, Any, Any, str]]:
    """(dotted key, type, default, help) of each field with a ``--flag``: the top level and ``flatten`` sections."""
    return [row for row in describe(cls) if "." not in row[0] or row[0].split(".")[0] in flatten
            and row[0].count(".") == 1]


def add_config_arguments(
    parser: argparse.ArgumentParser,
    cls: type,
    *,
    flatten: tuple[str, ...] = (),
    flags: bool = True,
    config_file: bool = True,
    positional: tuple[str, ...] = (),
    overrides: bool = True,
    config_help: str = "YAML file with the command's config (flags and KEY=VALUE override it)",
) -> None:
    """Add ``--config``, a ``--flag`` per field of ``cls`` (and of the ``flatten`` sections, by their own names),
    ``positional`` fields as positional arguments, and ``KEY=VALUE`` overrides; the other keys go into the epilog."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.set_defaults(config_class=cls)
    if config_file:
        parser.add_argument("--config", metavar="FILE", help=config_help)
    flagged = set()
    for key, tp, default, doc in _flag_fields(cls, flatten) if flags else []:
        name = key.split(".")[-1]
        flagged.add(key)
        dest = _DEST + key.replace(".", "__")
        shown = f" (default: {default})" if default not in (None, "", [], {}) else ""
        if name in positional:
            parser.add_argument(dest, metavar=name.upper(), help=doc + shown)
            continue
        kwargs: dict[str, Any] = {"dest": dest, "default": argparse.SUPPRESS, "help": (doc + shown) or None}
        if _is_bool(tp):
            kwargs.update(action=argparse.BooleanOptionalAction)
        elif typing.get_origin(tp) is typing.Literal:
            kwargs.update(choices=[str(a) for a in typing.get_args(tp)])
        elif _is_list(tp):
            kwargs.update(nargs="*", metavar="V")
        else:
            kwargs.update(metavar=name.upper())
        parser.add_argument("--" + name.replace("_", "-"), **kwargs)
    rest = [row for row in describe(cls) if row[0] not in flagged]
    if rest:
        lines = [f"  {key}={type_name(tp)}  (default: {default})" + (f"\n      {doc}" if doc else "")
                 for key, tp, default, doc in rest]
        parser.epilog = "keys settable as KEY=VALUE:\n" + "\n".join(lines)
    if overrides:
        parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dot-list overrides, e.g. a.b=1")


def _flag_value(raw: Any, tp: Any) -> Any:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, list):  # nargs="*": "--lrs 0.1 0.2", "--unfrozen-blocks 0,-1", "--unfrozen-blocks ''"
        items = [t for token in raw for t in str(token).split(",") if t.strip()]
        item_tp = next((typing.get_args(a) for a in [tp, *typing.get_args(tp)] if typing.get_origin(a) in (list,
                        tuple)), ())
        as_str = bool(item_tp) and item_tp[0] is str
        return [t if as_str else parse_value(t) for t in items]
    if _is_str(tp) and not _is_bool(tp):
        return raw
    return parse_value(raw)


def config_from_args(args: argparse.Namespace, path: str | Path | None = None) -> Any:
    """The command's config: its YAML (``path`` or ``--config``), then the flags given, then the overrides."""
    cls = args.config_class
    path = path if path is not None else vars(args).get("config")
    data = load_yaml(path) if path else {}
    hints = _flag_types(cls)
    for dest, raw in vars(args).items():
        if not dest.startswith(_DEST):
            continue
        keys = dest[len(_DEST) :].split("__")
        node = data
        for part in keys[:-1]:
            node = node.setdefault(part, {})
        node[keys[-1]] = _flag_value(raw, hints.get(".".join(keys), Any))
    data = merge_overrides(data, list(vars(args).get("overrides") or []))
    return from_dict(cls, resolve(data), "config")


def _flag_types(cls: type) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f, tp in typing.get_type_hints(cls).items():
        inner = section_type(tp)
        if inner is not None:
            out.update({f"{f}.{k}": v for k, v in _flag_types(inner).items()})
        else:
            out[f] = tp
    return out


def build(cls: type[T], argv: list[str], **kwargs: Any) -> T:
    """Parse ``argv`` for ``cls`` alone (tests, notebooks): ``build(LinprobeConfig, ["--data", "x", "epochs=3"])``."""
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, cls, **kwargs)
    return config_from_args(parser.parse_args(argv))


__all__ = ["add_config_arguments", "build", "config_from_args"]
