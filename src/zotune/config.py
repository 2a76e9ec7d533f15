"""Filling typed config dataclasses from YAML files, `key=value` overrides and CLI flags.

Each concern owns its dataclass (ModelConfig in models.py, TaskConfig in tasks, MethodConfig in
methods, RunConfig in schedule.py) and validates itself in `__post_init__`, raising ConfigError with
one sentence that names the problem and the fix.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import types
import typing
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A bad user input, reported as one line naming the problem and the fix."""


@functools.cache
def _yaml_loader():
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                 list("tTfF"))

    def construct_mapping(loader, node, deep=False):  # a key twice is a mistake, not "the last one wins"
        seen = set()
        for key_node, _ in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else id(key_node)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"the key {key!r} appears twice",
                                                        key_node.start_mark)
            seen.add(key)
        return yaml.SafeLoader.construct_mapping(loader, node, deep)

    Loader.construct_mapping = construct_mapping
    return Loader


def yaml_load(text: str) -> Any:
    """`text` parsed as YAML with YAML 1.2's booleans: only true / false, so a label written yes, no,
    on or off (booleans to YAML 1.1, as PyYAML reads them) stays the word it is."""
    import yaml

    return yaml.load(text, Loader=_yaml_loader())  # noqa: S506 -- a SafeLoader


def _yaml_value(text: str, where: str | None = None) -> Any:
    """`text` parsed as YAML; when it does not parse, a ConfigError naming `where`, or without one the text."""
    import yaml

    try:
        return yaml_load(text)
    except yaml.YAMLError as e:
        if where is None:
            return text
        why = str(e).splitlines()[0]
        fix = "give each key once" if "appears twice" in why else "quote the strings in it"
        raise ConfigError(f"{where}={text!r} is not valid YAML ({why}); {fix}") from None


def _whole_number(value: Any, where: str) -> int:
    """`value` as an int: a whole number that fits in 64 bits (never rounded, never infinite)."""
    if isinstance(value, bool):
        raise ConfigError(f"{where}={value!r} is not a whole number")
    try:
        number = value if isinstance(value, int) else int(str(value).strip())
    except ValueError:
        try:
            as_float = float(str(value).strip())
        except ValueError:
            raise ConfigError(f"{where}={value!r} is not a number; give a whole number") from None
        if not (math.isfinite(as_float) and as_float.is_integer()):
            raise ConfigError(f"{where}={value!r} is not a whole number; give one, e.g. {where}=100")
        number = int(as_float)
    if not -2**63 <= number < 2**63:
        raise ConfigError(f"{where}={value!r} is too large; give a number below 2**63")
    return number


def coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert a YAML/CLI value to the field's declared type, or raise ConfigError."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        return coerce(value, args[0], where)
    if origin is dict:
        value = _yaml_value(value, where) if isinstance(value, str) else value
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping like {{a: 1}}, got {value!r}")
        return {str(k): str(v) for k, v in value.items()}
    if origin is list:
        value = (_yaml_value(value, where) if value.strip() else []) if isinstance(value, str) else value
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list like [a, b], got {value!r}")
        return [str(v) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("1", "true", "yes", "on"):
            return True
        if str(value).lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{where}={value!r} is not a boolean; use true or false")
    if tp is int:
        return _whole_number(value, where)
    if tp is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}={value!r} is not a float; give a number") from None
    if tp is str:
        if isinstance(value, str) and value[:1] in ("'", '"'):  # a quoted YAML scalar: '\n' is a newline
            parsed = _yaml_value(value)
            return parsed if isinstance(parsed, str) else value
        return str(value)
    if isinstance(value, str) and tp is not typing.Any:  # e.g. a number for a field typed by a class
        return _yaml_value(value)
    return value


def build(cls: type, values: dict[str, Any], section: str) -> Any:
    """Instantiate dataclass `cls` from a dict, checking names and types first."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"unknown option {section}.{unknown[0]}; known options of {section}: {', '.join(fields)}")
    kwargs = {k: coerce(v, hints[k], f"{section}.{k}") for k, v in values.items()}
    return cls(**kwargs)


def parse_overrides(items: list[str], notes: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """`section.key=value` strings -> {section: {key: value}}, values as given: `build` parses each by its
    field's type (so a template such as `{text}` stays text, and a verbalizer `{a: b}` becomes a mapping).
    A key given twice takes its last value; `notes` collects a sentence saying so."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot or not name:
            raise ConfigError(f"override {item!r} is not of the form section.key=value (e.g. method.lr=1e-3)")
        if name in out.get(section, {}) and notes is not None and out[section][name] != raw:
            notes.append(f"{key} is given twice ({out[section][name]!r}, then {raw!r}): the last one counts")
        out.setdefault(section, {})[name] = raw
    return out


def load_yaml(path: str | Path) -> dict[str, dict[str, Any]]:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass an existing YAML file to --config")
    try:
        data = yaml_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ConfigError(f"config file {path} must map sections (model, task, method, run) to options")
    return data


def merge(*layers: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for layer in layers:
        for section, values in layer.items():
            out.setdefault(section, {}).update(values)
    return out


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
