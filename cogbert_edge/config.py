"""Typed configuration, twelve-factor style: dataclass defaults, then ``COGBERT_*`` environment
variables, then command-line flags, each overriding the one before.

    @dataclass
    class IngestSettings:
        broker: str = "mqtts://localhost:8883"
        batch_bytes: int = 131072

    add_arguments(parser, IngestSettings, env_prefix="INGEST_")   # --broker, --batch-bytes
    settings = from_args(IngestSettings, args, env_prefix="INGEST_")
    # $COGBERT_INGEST_BROKER overrides the default; --broker overrides both.

Supported field types: str, int, float, bool, pathlib.Path, ``X | None`` of those, and
``tuple[X, ...]`` (comma-separated in the environment and on the command line).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from cogbert_edge.errors import ConfigError

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

__all__ = ["add_arguments", "from_args", "load", "env_name"]

T = TypeVar("T", bound="DataclassInstance")   # a dataclass type: its fields are the settings
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def env_name(field: str, env_prefix: str = "") -> str:
    return f"COGBERT_{env_prefix}{field}".upper()


def load(cls: type[T], *, env_prefix: str = "", environ: Mapping[str, str] | None = None,
         **overrides: Any) -> T:
    """Build ``cls`` from defaults, the environment and ``overrides`` (``None`` means unset)."""
    environ = os.environ if environ is None else environ
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        value = overrides.get(f.name)
        if value is None:
            raw = environ.get(env_name(f.name, env_prefix))
            if raw is not None:
                value = _parse(hints[f.name], raw, env_name(f.name, env_prefix))
        elif isinstance(value, str) and hints[f.name] is not str:
            value = _parse(hints[f.name], value, "--" + f.name.replace("_", "-"))
        if value is not None:
            kwargs[f.name] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"invalid {cls.__name__}: {e}") from None


def add_arguments(parser: argparse.ArgumentParser, cls: type, *, env_prefix: str = "",
                  skip: tuple[str, ...] = ()) -> None:
    """Add one ``--flag`` per field of ``cls``; the help text names the environment variable."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init or f.name in skip:
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        doc = f.metadata.get("help", "")   # dataclasses makes metadata an empty mapping when not given
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        help_text = f"{doc} (env {env_name(f.name, env_prefix)}; default {shown})".strip()
        flag = "--" + f.name.replace("_", "-")
        if _base(hints[f.name]) is bool:
            parser.add_argument(flag, dest=f.name, default=None, action=argparse.BooleanOptionalAction,
                                help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, default=None, metavar=f.name.upper(), help=help_text)


def from_args(cls: type[T], args: argparse.Namespace, *, env_prefix: str = "", **extra: Any) -> T:
    """``load`` with the flags that :func:`add_arguments` added (and ``extra`` overrides)."""
    names = {f.name for f in dataclasses.fields(cls)}
    given = {k: v for k, v in vars(args).items() if k in names}
    given.update(extra)
    return load(cls, env_prefix=env_prefix, **given)


def _base(tp: Any) -> Any:
    """Strip ``Optional``: ``int | None`` -> ``int``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _parse(tp: Any, raw: str, where: str) -> Any:
    tp = _base(tp)
    try:
        if typing.get_origin(tp) is tuple:
            (item, *_rest) = typing.get_args(tp)
            return tuple(_parse(item, part.strip(), where) for part in raw.split(",") if part.strip())
        if tp is bool:
            low = raw.strip().lower()
            if low in _TRUE:
                return True
            if low in _FALSE:
                return False
            raise ValueError("expected one of 1/0, true/false, yes/no, on/off")
        if tp in (int, float, str):
            return tp(raw)
        if tp is Path:
            return Path(raw).expanduser()
    except ValueError as e:
        raise ConfigError(f"{where}={raw!r}: {e}") from None
    raise ConfigError(f"{where}: unsupported setting type {tp!r}")
