"""Generic machinery of typed configs: nested dicts checked against dataclasses.

Schema-free on purpose (the schema is ``ppt.config``): annotation checking and conversion,
unknown keys with the nearest valid key, ``key=value`` overrides parsed as YAML, section-wise
merging. Every mistake raises :class:`ConfigError` with one message naming the key.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config file or override that does not match the schema (message says how to fix it)."""


def plain(value: Any) -> Any:
    """Dataclass dicts as YAML-friendly containers (tuples become lists)."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, where: str) -> Any:
    """Check ``value`` against annotation ``tp``; returns it converted (int -> float, list -> tuple)."""
    def fail() -> ConfigError:
        shown = repr(value) if len(repr(value)) < 60 else repr(value)[:57] + "..."
        return ConfigError(f"config key '{key}'{where} must be {_type_name(tp)}, "
                           f"got {type(value).__name__} ({shown})")

    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise fail()
        return float(value)
    if tp in (int, str, bool):
        if type(value) is not tp:  # bool is an int subclass: reject it for int and vice versa
            raise fail()
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise fail()
        item = args[0] if args else Any
        items = [_coerce(v, item, f"{key}[{i}]", where) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise fail()
        kt, vt = args
        return {_coerce(k, kt, f"{key} (key {k!r})", where): _coerce(v, vt, f"{key}.{k}", where)
                for k, v in value.items()}
    if origin in (typing.Union, types.UnionType):
        for option in args:
            if option is type(None) and value is None:
                return None
            try:
                return _coerce(value, option, key, where)
            except ConfigError:
                continue
        raise fail()
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):  # e.g. the values of Config.datasets
        if dataclasses.is_dataclass(value):
            value = dataclasses.asdict(value)
        return from_dict(tp, value if value is not None else {}, f"{key}.", where)
    raise TypeError(f"unsupported annotation {tp} for {key}")


def field_types(cls) -> dict[str, Any]:
    """Field name -> resolved annotation of a dataclass."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _all_keys(cls, prefix: str = "") -> list[str]:
    keys = []
    for name, tp in field_types(cls).items():
        if dataclasses.is_dataclass(tp):
            keys += _all_keys(tp, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


def _unknown(root, key: str, where: str) -> ConfigError:
    valid = _all_keys(root) if "." in key else list(field_types(root))  # a section or a leaf
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    if not close and "." not in key:
        valid = _all_keys(root)
    if not close:  # a bare leaf name ("lr") or a misspelt section: match on the last part
        leaf = key.rsplit(".", 1)[-1]
        close = [k for k in valid if k.rsplit(".", 1)[-1] == leaf] or \
            difflib.get_close_matches(key, valid, n=1, cutoff=0.3)
    hint = f"; did you mean '{close[0]}'?" if close else f"; valid sections: {', '.join(field_types(root))}"
    return ConfigError(f"unknown config key '{key}'{where}{hint}")


def from_dict(cls, data: Any, prefix: str = "", where: str = "", root=None):
    """Build dataclass ``cls`` from a nested dict: unknown keys (with the nearest valid key
    of ``root``, the outermost dataclass) and wrong types raise ConfigError naming ``where``."""
    root = root or cls
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<root>'}'{where} must be a mapping, "
                          f"got {type(data).__name__}")
    fields = field_types(cls)
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}{name}"
        if name not in fields:
            raise _unknown(root, key, where)
        tp = fields[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = from_dict(tp, value if value is not None else {}, f"{key}.", where, root)
        else:
            kwargs[name] = _coerce(value, tp, key, where)
    return cls(**kwargs)


def parse_overrides(overrides: list[str] | tuple[str, ...]) -> dict:
    """``["optim.lr=0.1", "data.mix={scannet: 2}"]`` -> nested dict (values via yaml.safe_load)."""
    nested: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. optim.lr=0.01)")
        key, text = item.split("=", 1)
        key = key.strip()
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({err})") from None
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with an earlier override")
        node[parts[-1]] = value
    return nested


def merge_sections(base: dict, update: dict, sections: set[str]) -> dict:
    """``update`` over ``base``: a section (a key of ``sections``) is merged key by key, every
    leaf below it (including dict-valued leaves such as ``data.mix``) is replaced whole."""
    out = dict(base)
    for key, value in update.items():
        if key in sections and isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out
