"""Typed dataclass configs and dotted `key=value` overrides.

A run's config is a tree of small dataclasses (model, data, train, optim, schedule, ...). The CLI changes it
with dotted overrides such as `optim.lr=0.05 model.hidden=512`. Every value is parsed and checked against the
field's type annotation before anything runs; an unknown key is rejected with the closest valid names.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import types
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints


class ConfigError(ValueError):
    """A bad override or config value. The CLI prints it and exits with code 2."""


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config tree as plain JSON-able dicts (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """{'optim.lr': 0.1, 'model.hidden': 1024, ...} for a dataclass tree or a nested dict."""
    tree = to_dict(cfg) if dataclasses.is_dataclass(cfg) else cfg
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def valid_keys(cfg: Any) -> list[str]:
    """Every dotted key that can be overridden."""
    keys: list[str] = []
    for field in dataclasses.fields(cfg):
        value = getattr(cfg, field.name)
        if dataclasses.is_dataclass(value):
            keys.extend(f"{field.name}.{k}" for k in valid_keys(value))
        else:
            keys.append(field.name)
    return keys


def _suggest(key: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(key, choices, n=3, cutoff=0.5)
    # Also match on the last component alone: `lr` should suggest `optim.lr`.
    tail = key.rsplit(".", 1)[-1]
    close += [c for c in choices if c.rsplit(".", 1)[-1] == tail and c not in close]
    return f" Did you mean: {', '.join(close[:4])}?" if close else ""


_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}
_NONE = {"none", "null"}


def parse_value(text: str, annotation: Any, key: str) -> Any:
    """Parse the string `text` as a value of type `annotation` (the field's type hint)."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in (Union, types.UnionType):
        if type(None) in args and text.strip().lower() in _NONE:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return parse_value(text, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}={text!r}: expected {_type_name(annotation)}")
    if origin is Literal:
        for choice in args:
            if str(choice) == text:
                return choice
        raise ConfigError(f"{key}={text!r}: expected one of {', '.join(map(str, args))}")
    if origin in (tuple, list):
        parts = [p for p in text.strip("()[] ").split(",") if p.strip()] if text.strip("()[] ") else []
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(parts) != len(args):
                raise ConfigError(f"{key}={text!r}: expected {len(args)} comma-separated values")
            return tuple(parse_value(p.strip(), a, key) for p, a in zip(parts, args, strict=True))
        item = args[0] if args else str
        values = [parse_value(p.strip(), item, key) for p in parts]
        return tuple(values) if origin is tuple else values
    if annotation is bool:
        low = text.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ConfigError(f"{key}={text!r}: expected a boolean (true/false)")
    if annotation is int:
        try:
            return int(text.replace("_", ""))
        except ValueError:
            # Allow 1e4 style for ints when it is integral.
            try:
                as_float = float(text)
            except ValueError:
                as_float = None
            if as_float is not None and as_float.is_integer():
                return int(as_float)
            raise ConfigError(f"{key}={text!r}: expected an integer") from None
    if annotation is float:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"{key}={text!r}: expected a number") from None
    if annotation is str:
        return text
    if annotation is dict or origin is dict:  # a JSON object, e.g. model.rope_scaling={"rope_type":"linear"}
        try:
            value = json.loads(text)
        except ValueError:
            value = None
        if not isinstance(value, dict):
            raise ConfigError(f'{key}={text!r}: expected a JSON object, e.g. {{"name": 1}}') from None
        return value
    raise ConfigError(f"{key}: overriding fields of type {_type_name(annotation)} is not supported")


def _type_name(annotation: Any) -> str:
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return "one of " + ", ".join(map(str, args))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if annotation is type(None):
        return "none"
    if annotation is dict or origin is dict:
        return "a JSON object"
    return getattr(annotation, "__name__", str(annotation))


def check_value(value: Any, annotation: Any, key: str) -> None:
    """Raise ConfigError when a (programmatic) value does not fit the annotation."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in (Union, types.UnionType):
        for arg in args:
            try:
                check_value(value, arg, key)
                return
            except ConfigError:
                pass
        raise ConfigError(f"{key}={value!r}: expected {_type_name(annotation)}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}={value!r}: expected one of {', '.join(map(str, args))}")
        return
    if annotation is type(None):
        if value is not None:
            raise ConfigError(f"{key}={value!r}: expected none")
        return
    if origin in (tuple, list):
        if not isinstance(value, (tuple, list)):
            raise ConfigError(f"{key}={value!r}: expected a {origin.__name__}")
        return
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}={value!r}: expected a number")
        return
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}={value!r}: expected an integer")
        return
    if isinstance(annotation, type) and not isinstance(value, annotation):
        raise ConfigError(f"{key}={value!r}: expected {_type_name(annotation)}")


def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def apply_overrides(cfg: Any, overrides: list[str]) -> Any:
    """A copy of `cfg` with each `dotted.key=value` applied, parsed and checked against its type."""
    cfg = copy.deepcopy(cfg)
    keys = valid_keys(cfg)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, text = item.split("=", 1)
        key = key.strip()
        node = cfg
        parts = key.split(".")
        for depth, name in enumerate(parts):
            is_last = depth == len(parts) - 1
            names = {f.name for f in dataclasses.fields(node)}
            child = getattr(node, name, None) if name in names else None
            if (
                name not in names
                or (is_last and dataclasses.is_dataclass(child))
                or (not is_last and not dataclasses.is_dataclass(child))
            ):
                raise ConfigError(f"unknown config key {key!r}.{_suggest(key, keys)}")
            if is_last:
                value = parse_value(text, _hints(type(node))[name], key)
                setattr(node, name, value)
            else:
                node = child
    validate(cfg)
    return cfg


def validate(cfg: Any, prefix: str = "") -> None:
    """Check every field's value against its annotation, then run each dataclass's own `__post_init__`."""
    hints = _hints(type(cfg))
    for field in dataclasses.fields(cfg):
        value = getattr(cfg, field.name)
        key = f"{prefix}{field.name}"
        if dataclasses.is_dataclass(value):
            validate(value, key + ".")
        else:
            check_value(value, hints[field.name], key)
    post_init = getattr(cfg, "__post_init__", None)
    if post_init is not None:
        try:
            post_init()
        except (ValueError, TypeError) as err:
            raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {err}") from err


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Rebuild a dataclass tree from `to_dict` output (as stored in a run's config.json)."""
    hints = _hints(cls)
    kwargs: dict[str, Any] = {}
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(f"unknown config keys {sorted(prefix + k for k in unknown)}")
    for field in dataclasses.fields(cls):
        if field.name not in data:
            continue
        value, hint = data[field.name], hints[field.name]
        if dataclasses.is_dataclass(hint):
            kwargs[field.name] = from_dict(hint, value, f"{prefix}{field.name}.")
        elif get_origin(hint) is tuple or (
            get_origin(hint) in (Union, types.UnionType)
            and any(get_origin(a) is tuple for a in get_args(hint))
            and isinstance(value, list)
        ):
            kwargs[field.name] = tuple(value)
        else:
            kwargs[field.name] = value
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {err}") from err
