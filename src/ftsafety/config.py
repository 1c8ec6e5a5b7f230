"""Strict loading of nested config dataclasses from YAML and `key=value` overrides.

An unknown key is an error that suggests the nearest known key; a value of the wrong type is an
error naming the key, the expected type and the value. Nothing is coerced silently except an int
where a float is expected.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from ftsafety.errors import FtsafetyError


MAX_RECIPE_VALUES = 100_000  # a recipe is a few hundred values; YAML aliases can make billions of them


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key written twice in one mapping (plain YAML keeps the last, silently).
    Merge keys (`<<: *defaults`) are YAML's own way to share a section and are kept: keys a mapping
    writes itself override merged ones, as YAML specifies."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (each key once per section)", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_yaml(path: str | Path) -> dict:
    """A YAML file whose top level is a mapping; one-line errors for missing, empty or malformed files."""
    p = Path(path)
    if p.is_dir():
        example = next(iter(sorted(p.glob("*.yaml"))), None)
        raise FtsafetyError(f"{p} is a directory; give a recipe file" + (f" such as {example}" if example else ""))
    if p.exists() and not p.is_file():
        raise FtsafetyError(f"{p} is not a regular file (a pipe or a device); give a recipe file")
    if not p.is_file():
        raise FtsafetyError(f"{p}: recipe file does not exist")
    if p.stat().st_size > 1 << 20:
        raise FtsafetyError(f"{p}: {p.stat().st_size / 2**20:.0f} MB is not a recipe (a recipe is a few kB)")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise FtsafetyError(f"{p}: not UTF-8 text (byte {exc.start})") from exc
    try:
        loader = _UniqueKeyLoader(text)
        try:
            root = loader.get_single_node()
            if root is not None and _expanded_size(root, {}) > MAX_RECIPE_VALUES:
                raise FtsafetyError(f"{p}: the recipe expands to more than {MAX_RECIPE_VALUES:,} values (YAML aliases "
                                    "nested inside each other?); write its sections out")
            data = loader.construct_document(root) if root is not None else None
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise FtsafetyError(f"{p}: malformed YAML{where}: {problem}") from exc
    if data is None:
        raise FtsafetyError(f"{p}: the recipe is empty")
    if not isinstance(data, dict):
        raise FtsafetyError(f"{p}: the top level must be a mapping of keys, got a {type(data).__name__}")
    return data


def _expanded_size(node, memo: dict) -> int:
    """How many values `node` becomes once every alias is expanded, counted on the node graph (an alias is
    a shared node), so a billion-laughs recipe is measured in microseconds, not built."""
    key = id(node)
    if key in memo:
        return memo[key]
    memo[key] = 1  # a node met again while counting itself (a recursive alias): counted once
    if isinstance(node, yaml.MappingNode):
        size = 1 + sum(_expanded_size(k, memo) + _expanded_size(v, memo) for k, v in node.value)
    elif isinstance(node, yaml.SequenceNode):
        size = 1 + sum(_expanded_size(v, memo) for v in node.value)
    else:
        size = 1
    memo[key] = size
    return size


def parse_value(text: str) -> Any:
    """The value of a command-line override, read as YAML (`0.1` -> float, `true` -> bool, `[0, 0.1]` -> list)."""
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        return text
    if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
        return float(value)  # YAML 1.1 reads 5e-5 (no dot) as a string; on the command line it is a number
    return value


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def apply_overrides(data: dict, overrides: list[str], where: str = "override") -> dict:
    """Return a copy of `data` with each `a.b.c=value` set (the keys are checked later, by `build`)."""
    out = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise FtsafetyError(f"{where} {item!r}: expected key=value (for example finetune.harmful_ratio=0.2)")
        key, value = item.split("=", 1)
        set_dotted(out, key.strip(), parse_value(value))
    return out


def set_dotted(data: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    if not key or any(not p.strip() for p in parts):
        raise FtsafetyError(f"override {key!r}: empty key part (write section.key=value, e.g. align.n=300)")
    node = data
    for p in parts[:-1]:
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            raise FtsafetyError(f"override {key!r}: {p!r} is a value, not a section")
        node = nxt
    node[parts[-1]] = value


def _field_default(f: dataclasses.Field):
    """A field's own default value (its factory's product), or MISSING."""
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def build(cls, data: Any, where: str = "", source: str = "recipe", defaults=None):
    """Instantiate dataclass `cls` from a mapping, recursively and strictly.

    A nested section that names only some keys is laid over that section's own default (the field's
    default instance in its parent: `finetune.train` over the fine-tune's TrainConfig, not over
    TrainConfig's class defaults), so a recipe that leaves a key out gets what the matching command
    would use. `defaults`: the instance whose values stand for the keys `data` leaves out."""
    prefix = f"{where}." if where else ""
    if not isinstance(data, dict):
        raise FtsafetyError(f"{source}: {where or 'the top level'} must be a mapping, got {_show(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        if not isinstance(key, str) or key not in fields:
            near = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.6)
            hint = f" (did you mean '{prefix}{near[0]}'?)" if near else f"; known keys: {', '.join(fields)}"
            raise FtsafetyError(f"{source}: unknown key '{prefix}{key}'{hint}")
        base = getattr(defaults, key) if defaults is not None else _field_default(fields[key])
        if dataclasses.is_dataclass(base) and isinstance(value, dict):
            kwargs[key] = build(type(base), value, f"{prefix}{key}", source, defaults=base)
        else:
            kwargs[key] = _convert(hints[key], value, f"{prefix}{key}", source)
    if defaults is not None:  # the keys `data` leaves out keep the section's own defaults
        for name in fields:
            if name not in kwargs:
                kwargs[name] = copy.deepcopy(getattr(defaults, name))
    missing = [n for n, f in fields.items() if n not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise FtsafetyError(f"{source}: missing key '{prefix}{missing[0]}'")
    try:
        return cls(**kwargs)
    except FtsafetyError as exc:
        raise FtsafetyError(f"{source}: {where + ': ' if where else ''}{exc}") from exc


def _convert(tp, value, key: str, source: str):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for a in inner:
            try:
                return _convert(a, value, key, source)
            except FtsafetyError as exc:
                errors.append(exc)
        raise errors[0]
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key, source)
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise FtsafetyError(f"{source}: {key} must be a list, got {_show(value)}")
        item = args[0] if args else Any
        return [_convert(item, v, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise FtsafetyError(f"{source}: {key} must be a mapping, got {_show(value)}")
        vt = args[1] if len(args) == 2 else Any
        return {str(k): _convert(vt, v, f"{key}.{k}", source) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):  # YAML 1.1 reads 1e-3 (no dot) as text
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - a field type this loader does not know
        return value
    raise FtsafetyError(f"{source}: {key} must be {_TYPE_NAMES.get(tp, tp.__name__)}, got {_show(value)}")


_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _show(value) -> str:
    if value is None:
        return "nothing (null)"
    import reprlib

    short = reprlib.Repr()
    short.maxlevel, short.maxlist, short.maxdict, short.maxstring, short.maxother = 3, 4, 4, 60, 60
    text = short.repr(value)  # bounded: a value built from nested aliases is never printed whole
    return f"{text[:60]}{'...' if len(text) > 60 else ''} ({type(value).__name__})"


def to_dict(obj) -> dict:
    return dataclasses.asdict(obj)
