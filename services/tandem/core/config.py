"""Configuration: frozen dataclasses loaded from YAML (the same files the Helm chart mounts).

Every field carries a one-line doc (`field(metadata={"doc": ...})`). An unknown key or a
value of the wrong type is a ConfigError that names the field by its dotted path.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from tandem.core.errors import ConfigError

T = TypeVar("T")


def doc(text: str, default: Any = dataclasses.MISSING, default_factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with a one-line description."""
    return dataclasses.field(default=default, default_factory=default_factory, metadata={"doc": text})


def load_config(cls: type[T], source: str | Path | dict[str, Any] | None) -> T:
    """Build `cls` from a YAML file path, a mapping, or None (all defaults)."""
    if source is None:
        data: Any = {}
    elif isinstance(source, dict):
        data = source
    else:
        try:
            data = yaml.safe_load(Path(source).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"{source}: cannot read YAML ({e})") from None
    return _build(cls, data, prefix="")


def dump_config(config: Any) -> str:
    """The YAML form of a config object, loadable by `load_config`."""
    return yaml.safe_dump(dataclasses.asdict(config), sort_keys=False)


def _build(cls: type[T], data: Any, prefix: str) -> T:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(typing.cast(Any, cls))}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown config field {prefix}{unknown[0]!r}; known: {', '.join(fields)}")
    kwargs = {name: _convert(hints[name], value, f"{prefix}{name}") for name, value in data.items()}
    try:
        obj = cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{prefix or 'config'}: {e}") from None
    validate = getattr(obj, "validate", None)
    if validate:
        validate()
    return obj


def _convert(hint: Any, value: Any, name: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        for arm in inner[:-1]:  # the first arm the value fits; the last one's error otherwise
            try:
                return _convert(arm, value, name)
            except ConfigError:
                continue
        return _convert(inner[-1], value, name)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return _build(hint, value, prefix=f"{name}.")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config field {name!r} must be a list, got {value!r}")
        item = args[0] if args else Any
        return tuple(_convert(item, v, f"{name}[{i}]") for i, v in enumerate(value))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and not (isinstance(value, hint) and not (hint is int and isinstance(value, bool))):
        raise ConfigError(f"config field {name!r} must be {hint.__name__}, got {value!r}")
    return value
