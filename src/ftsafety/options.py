"""Command-line options generated from the config dataclasses (one source of truth per knob).

A config field declares its option once, with `knob(default, help, ...)`: its default, its help
text and, where the name users know differs from the field's, its flags. A stage command is then
a list of `Group`s (a dataclass, an option prefix, and the instance whose values are the command's
defaults), and `command()` builds the typer signature from them and the typed configs back from
the parsed options, as HfArgumentParser does for TrainingArguments. Nothing is written twice:
adding a field to a defense's config adds its option to every command that trains that defense.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from dataclasses import dataclass, field
from typing import Annotated, Any, Callable, Optional

KNOB_HELP = "help"
KNOB_FLAGS = "flags"
KNOB_CLI = "cli"
KNOB_KEY_WHEN_SET = "key_when_set"


def knob(default: Any = dataclasses.MISSING, help: str = "", *, flags: tuple[str, ...] = (),
         factory: Callable[[], Any] | None = None, cli: bool = True, key_when_set: bool = False):
    """A dataclass field with the metadata its command-line option is built from.

    `key_when_set`: the field enters a stage's cache key (`config_key`) only when it differs from its
    default, so a knob added later leaves the keys of stages that never set it, and their caches, alone."""
    meta = {KNOB_HELP: help, KNOB_FLAGS: tuple(flags), KNOB_CLI: cli, KNOB_KEY_WHEN_SET: key_when_set}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class Group:
    """The options one config dataclass contributes to a command.

    `prefix` is put before every field name (`lora_` makes `--lora-r`); `defaults` is the instance
    whose values are the options' defaults (a stage's own defaults, e.g. the fine-tune's lr 1e-4);
    `skip` names fields that are not options of this command (they keep `defaults`' value);
    `fixed` sets fields to a value without an option (the `method` of `align-vaccine`).
    Fields that are themselves dataclasses become their own groups through `nested`.
    """

    name: str
    cls: type
    prefix: str = ""
    defaults: Any = None
    skip: tuple[str, ...] = ()
    fixed: dict = field(default_factory=dict)
    nested: tuple["Group", ...] = ()

    def base(self):
        return self.defaults if self.defaults is not None else self.cls()

    def fields(self):
        hints = typing.get_type_hints(self.cls)
        nested = {g.name for g in self.nested}
        for f in dataclasses.fields(self.cls):
            if not f.init or f.name in self.skip or f.name in self.fixed or f.name in nested:
                continue
            if not f.metadata.get(KNOB_CLI, True) or dataclasses.is_dataclass(hints[f.name]):
                continue
            yield f, hints[f.name]


def _option_type(tp):
    """The type typer parses: `int | None` becomes Optional[int]; other unions are not options."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return Optional[inner[0]] if len(inner) == 1 else str
    return tp


def parameters(group: Group, taken: set[str]) -> list[inspect.Parameter]:
    """Typer parameters for `group` (nested groups first-come: a name already `taken` is shared)."""
    import typer

    out = []
    base = group.base()
    for f, tp in group.fields():
        name = group.prefix + f.name
        if name in taken:
            continue
        taken.add(name)
        flags = f.metadata.get(KNOB_FLAGS) or ()
        if tp is bool and not flags:
            dashed = name.replace("_", "-")
            flags = (f"--{dashed}/--no-{dashed}",)
        flag = {"metavar": ""} if tp is bool else {}  # a flag takes no value: no <bool> in --help
        opt = typer.Option(*flags, help=f.metadata.get(KNOB_HELP) or None, **flag)
        out.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=getattr(base, f.name),
                                     annotation=Annotated[_option_type(tp), opt]))
    for g in group.nested:
        out += parameters(g, taken)
    return out


def collect(group: Group, values: dict):
    """The config `group` describes, from the parsed option values (by name)."""
    base = group.base()
    kwargs = {}
    for f in dataclasses.fields(group.cls):
        if not f.init:
            continue
        name = group.prefix + f.name
        if f.name in group.fixed:
            kwargs[f.name] = group.fixed[f.name]
        elif any(g.name == f.name for g in group.nested):
            kwargs[f.name] = collect(next(g for g in group.nested if g.name == f.name), values)
        elif name in values and f.name not in group.skip and f.metadata.get(KNOB_CLI, True):
            kwargs[f.name] = values[name]
        else:
            kwargs[f.name] = getattr(base, f.name)
    return group.cls(**kwargs)


def command(body: Callable[..., Any], groups: list[Group], extra: list[inspect.Parameter], doc: str):
    """A typer command: options `extra` then every group's; `body(configs, values)` runs it.

    `configs` maps each group's name to its built config; `values` holds every parsed option.
    """
    taken = {p.name for p in extra}
    params = list(extra)
    for g in groups:
        params += parameters(g, taken)

    def run(**values):
        configs = {g.name: collect(g, values) for g in groups}
        return body(configs, values)

    run.__signature__ = inspect.Signature(params)
    run.__annotations__ = {p.name: p.annotation for p in params}
    run.__doc__ = doc
    return run


def config_key(obj) -> Any:
    """`dataclasses.asdict(obj)`, recursively, without the `key_when_set` fields left at their default."""
    if not dataclasses.is_dataclass(obj):
        return obj
    out = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if f.metadata.get(KNOB_KEY_WHEN_SET) and f.default is not dataclasses.MISSING and value == f.default:
            continue
        out[f.name] = config_key(value) if dataclasses.is_dataclass(value) else value
    return out
