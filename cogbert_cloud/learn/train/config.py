"""Hyperparameter files: one per algorithm, per-environment entries, overrides, the resolved result.

The files shipped with the package (``cogbert_cloud/learn/configs/ppo.yml``, ``vtrace.yml``, ``imitate.yml``)
follow rl-baselines3-zoo's ``hyperparams/*.yml``: a mapping from environment id to the fields
that differ from the defaults, with a ``default`` entry for any other environment. A run's
configuration is resolved in this order, later winning:

1. the dataclass defaults (:class:`~cogbert_cloud.learn.train.ppo.PPOConfig`, ...);
2. the shipped file's ``default`` entry, then its entry for the environment;
3. ``--config FILE``: the same layout (its ``default`` and environment entries), or a flat
   mapping of fields (a file written for one run, like the ``config.yml`` a run saves);
4. ``--hp key=value`` (the value is read as YAML: ``--hp encoder=[128,128]``, ``--hp lr=1e-3``);
5. the dedicated flags (``--lr``, ``--epochs``, ``--num-envs``, ``--seed``).

An unknown key or a value of the wrong type is a :class:`ConfigError` naming the valid fields.
Files are read with ``yaml.safe_load`` (no Python objects from a file).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import yaml

from cogbert_edge.errors import ConfigError

__all__ = ["load_entries", "resolve", "parse_hp", "parse_kv", "to_plain", "shipped_file"]

T = TypeVar("T")


def shipped_file(algo: str) -> str:
    """The text of the package's hyperparameter file for ``algo`` (``ppo`` or ``vtrace``)."""
    return resources.files("cogbert_cloud.learn").joinpath("configs").joinpath(f"{algo}.yml").read_text()


def _read(text: str, where: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of environment ids (or of fields), got {type(data).__name__}")
    return data


def load_entries(data: dict[str, Any], env: str | None, fields: set[str], where: str) -> dict[str, Any]:
    """The overrides a file's mapping gives for ``env``: flat fields, or ``default`` then the
    entry for ``env`` (also matched without its ``-vN`` suffix)."""
    if data and set(data) <= fields:
        return dict(data)
    out: dict[str, Any] = {}
    keys = ["default"]
    if env:
        keys += [env.rsplit("-v", 1)[0], env]
    for key in dict.fromkeys(keys):
        entry = data.get(key)
        if entry is None:
            continue
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: entry {key!r} must be a mapping of fields, got {type(entry).__name__}")
        out.update(entry)
    return out


def parse_kv(items: list[str] | None, what: str) -> dict[str, Any]:
    """``["key=value", ...]`` with YAML-typed values (``3`` an int, ``1e-3`` a float, ``[64]`` a list)."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, eq, raw = item.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"{what} {item!r}: expected key=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        # YAML 1.1 reads 1e-3 as a string; numbers are what users mean there.
        if isinstance(value, str):
            try:
                value = float(value) if any(c in value for c in ".eE") else int(value)
            except ValueError:
                pass
        out[key.strip()] = value
    return out


def parse_hp(items: list[str] | None) -> dict[str, Any]:
    return parse_kv(items, "--hp")


def _coerce(name: str, hint: Any, value: Any) -> Any:
    origin = typing.get_origin(hint)
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    elif origin is tuple:
        if isinstance(value, int) and not isinstance(value, bool):
            value = [value]
        if isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return tuple(value)
    elif hint is dict or origin is dict:
        if isinstance(value, dict):
            return dict(value)
    elif origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is not type(None):
                try:
                    return _coerce(name, arg, value)
                except ConfigError:
                    pass
    else:
        return value
    raise ConfigError(f"hyperparameter {name}={value!r}: expected {getattr(hint, '__name__', hint)}")


def resolve(cls: type[T], algo: str, env: str | None, *, config_file: Path | None = None,
            hp: dict[str, Any] | None = None, flags: dict[str, Any] | None = None,
            base: dict[str, Any] | None = None) -> tuple[T, list[str]]:
    """The dataclass ``cls`` resolved as the module docstring says, and where each layer came
    from (for the run's record). ``base`` sits between the dataclass defaults and the shipped
    file (a field like ``env`` that the caller fixes)."""
    fields = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = dict(base or {})
    sources = [f"{algo}.yml (shipped)"]
    values.update(load_entries(_read(shipped_file(algo), f"shipped {algo}.yml"), env, fields, f"{algo}.yml"))
    if config_file is not None:
        try:
            text = Path(config_file).read_text()
        except OSError as e:
            raise ConfigError(f"--config {config_file}: {e.strerror or e}") from None
        values.update(load_entries(_read(text, str(config_file)), env, fields, str(config_file)))
        sources.append(str(config_file))
    if hp:
        values.update(hp)
        sources.append("--hp " + " ".join(f"{k}={v}" for k, v in hp.items()))
    for k, v in (flags or {}).items():
        if v is not None:
            values[k] = v
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ConfigError(f"unknown {algo} hyperparameter(s) {', '.join(unknown)}; valid: {', '.join(sorted(fields))}")
    typed = {k: _coerce(k, hints[k], v) for k, v in values.items()}
    return cls(**typed), sources


def to_plain(cfg: Any) -> dict[str, Any]:
    """A config dataclass as JSON/YAML-ready values (tuples as lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}
