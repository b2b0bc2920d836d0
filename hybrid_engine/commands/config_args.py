"""A step's config dataclass as command-line flags and as a YAML or JSON file.

Every field becomes one `--kebab-case` flag whose help is the field's attribute docstring (the string
literal on the line after it) and its default; a nested dataclass field (`tokens: TokenConfig`) is
flattened into its own fields' flags (`--max-prompt-len`). The flags put nothing in the namespace unless
given, so build_config can tell an explicit flag from a default: explicit flag > config file > default.

A config file is a mapping, either flat or with one section per command:

    lr: 5.0e-4                 # flat: field names, snake_case or kebab-case
    tokens: {max_prompt_len: 64}
    sft:                       # a section: read by `hybrid-engine sft` over the top-level keys
      max_steps: 100
      max-prompt-len: 64       # a nested dataclass's fields flat, or as a nested mapping
    reward:
      lr: 1.0e-5

Types are int, float, str, bool, torch.dtype, `tuple[X, ...]` of one of those (the flag takes one or more values,
the file a list), `X | None` (the flag takes the literal `none`; the file takes null) and nested dataclasses. A
float field also takes a string that float() reads, because YAML 1.1 reads `1e-3` (no dot) as a string. A
torch.dtype field takes a dtype's name ("bf16"), which the dataclass itself parses (model/dtypes.py), so a name is
checked once, against its setting's one allowed set.

A config class may name settings it has renamed, `RENAMED = {old flat name: new flat name}`: the old flag and
the old file key still work, with a warning. TRL's names (trl_names.py) work too, as flags and file keys, and every
flag also takes its snake_case spelling (`--max_steps`), as TRL's commands do.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import inspect
import json
import textwrap
import types
import typing
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hybrid_engine.commands import trl_names
from hybrid_engine.model.dtypes import dtype_name

SECTIONS = ("sft", "reward", "ppo")
"""The per-command sections a config file may have."""
SCALARS = (int, float, str, bool, torch.dtype)


@dataclass(frozen=True)
class FlatField:
    """One leaf field of a config dataclass, nested dataclasses flattened."""

    name: str
    """Its flat name: the field's own name, also the argparse dest (`max_prompt_len`)."""
    path: tuple[str, ...]
    """Its place in the config: ("tokens", "max_prompt_len")."""
    kind: type
    """int, float, str, bool or torch.dtype (given by name)."""
    optional: bool
    """The type is `kind | None`."""
    default: Any
    """The dataclass default."""
    doc: str
    """The field's attribute docstring ("" when it has none)."""
    many: bool = False
    """The type is `tuple[kind, ...]`: the flag takes one or more values, the file a list."""

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def type_name(self) -> str:
        name = "a dtype name such as 'bf16'" if self.kind is torch.dtype else self.kind.__name__
        name = f"a list of {name}" if self.many else name
        return name + (" or null" if self.optional else "")


def _kind_name(kind: type) -> str:
    return "dtype" if kind is torch.dtype else kind.__name__  # a dtype is given by name: "bf16"


class ConfigValues(dict):
    """The mapping a config file holds, with the file's path (for error messages)."""

    def __init__(self, values: Mapping, path: str):
        super().__init__(values)
        self.path = path


# -- reading the dataclass ------------------------------------------------------------------------------------


def _own_docs(cls: type) -> dict[str, str]:
    """The attribute docstrings written in `cls`'s own body."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # defined where there is no source (a REPL, exec)
        return {}
    body = next(n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ClassDef)).body
    docs = {}
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(inspect.cleandoc(after.value.value).split())
    return docs


def field_docs(cls: type) -> dict[str, str]:
    """Each field's attribute docstring, from `cls` and its dataclass bases (the nearest class's wins)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            docs.update(_own_docs(klass))
    return {f.name: docs.get(f.name, "") for f in dataclasses.fields(cls)}


def _unpack(hint: Any, where: str) -> tuple[Any, bool]:
    """(the type, whether it is `X | None`) of a field's resolved type hint."""
    origin = typing.get_origin(hint)
    if origin is typing.Union or (hasattr(types, "UnionType") and origin is types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) != 1 or len(typing.get_args(hint)) != 2:
            raise TypeError(f"{where}: only `X | None` unions are supported, got {hint}")
        return args[0], True
    return hint, False


def _item(hint: Any) -> Any:
    """X of `tuple[X, ...]`; None for any other type."""
    args = typing.get_args(hint)
    return args[0] if typing.get_origin(hint) is tuple and len(args) == 2 and args[1] is Ellipsis else None


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def flat_fields(cls: type, skip: Iterable[str] = (), prefix: tuple[str, ...] = ()) -> list[FlatField]:
    """The leaf fields of config dataclass `cls`, nested dataclasses flattened, without the names in `skip`.
    Two leaves of one name are refused (they would share a flag)."""
    hints, docs, skip = typing.get_type_hints(cls), field_docs(cls), set(skip)
    out: list[FlatField] = []
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init:
            continue
        kind, optional = _unpack(hints[f.name], f"{cls.__name__}.{f.name}")
        if dataclasses.is_dataclass(kind) and not optional:
            out += flat_fields(kind, skip, prefix + (f.name,))
        elif kind in SCALARS or _item(kind) in SCALARS:
            many = _item(kind) is not None
            out.append(FlatField(f.name, prefix + (f.name,), _item(kind) if many else kind, optional, _default(f),
                                 docs[f.name], many))
        else:
            raise TypeError(f"{cls.__name__}.{f.name}: unsupported field type {hints[f.name]}")
    seen: dict[str, FlatField] = {}
    for leaf in out:
        if leaf.name in seen:
            raise ValueError(f"{cls.__name__}: fields {'.'.join(seen[leaf.name].path)} and {'.'.join(leaf.path)} "
                             f"would both be {leaf.flag}")
        seen[leaf.name] = leaf
    return out


# -- flags ------------------------------------------------------------------------------------------------


def _parse_value(leaf: FlatField):
    """The argparse `type` of a leaf: its kind, or None for the literal `none` when optional."""

    def parse(text: str):
        if leaf.optional and text.lower() == "none":
            return None
        if leaf.kind is bool:
            return _parse_bool(text)
        if leaf.kind is torch.dtype:
            return text  # a name, parsed by the config dataclass
        return leaf.kind(text)

    parse.__name__ = _kind_name(leaf.kind)  # argparse names it in "invalid int value: 'x'"
    return parse


def _parse_bool(text: str) -> bool:
    words = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
    if text.lower() not in words:
        raise ValueError(text)
    return words[text.lower()]


def _help(leaf: FlatField) -> str:
    default = leaf.default
    if default is None:
        default = "none"
    elif leaf.many:
        default = " ".join(map(str, default))
    elif leaf.kind is torch.dtype:
        default = dtype_name(default)
    text = f"{leaf.doc} (default: {default})" if leaf.doc else f"(default: {default})"
    return text.replace("%", "%%")


def add_config_args(parser, cls: type, skip: Iterable[str] = ()) -> None:
    """One `--kebab-case` flag per leaf field of config dataclass `cls` on `parser` (a parser or an argument
    group), also spelt with TRL's name where it has one (`--lr, --learning_rate`), but none for the names in `skip`.
    Hidden: each flag's snake_case spelling, the renamed settings' old flags, and TRL's settings that have no
    meaning here (refused, saying why). Given flags land under the field's name; absent ones are not in the
    namespace at all."""
    leaves = {leaf.name: leaf for leaf in flat_fields(cls, skip)}
    trl = trl_names.aliases(leaves)
    for leaf in leaves.values():
        also = ["--" + name for name, ours in trl.items() if ours == leaf.name and name != trl_names.MICRO_BATCH]
        _add_flag(parser, leaf, [leaf.flag, *also], help=_help(leaf))
        if "_" in leaf.name:
            _add_flag(parser, leaf, ["--" + leaf.name], help=argparse.SUPPRESS)
    if trl_names.MICRO_BATCH in trl:  # hidden: TRL's micro-batch, multiplied by the accumulation (build_config)
        parser.add_argument("--" + trl_names.MICRO_BATCH, dest=trl[trl_names.MICRO_BATCH], type=int,
                            action=_TRLMicroBatch, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    for old, new in renamed(cls).items():
        if new in leaves:  # hidden: --help shows the new flag only
            parser.add_argument("--" + old.replace("_", "-"), dest=new, type=_parse_value(leaves[new]),
                                action=_RenamedFlag, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    for name in [*trl_names.FIXED, *trl_names.NO_MEANING]:
        if name not in leaves:
            parser.add_argument("--" + name, dest=f"trl_{name}", action=_TRLFlag, default=argparse.SUPPRESS,
                                help=argparse.SUPPRESS)


def _add_flag(parser, leaf: FlatField, flags: list[str], help: str) -> None:
    if leaf.kind is bool and not leaf.optional:
        parser.add_argument(*flags, dest=leaf.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                            help=help)
    elif leaf.many:
        parser.add_argument(*flags, dest=leaf.name, type=_parse_value(leaf), nargs="+", action=_Values,
                            metavar=_kind_name(leaf.kind).upper(), default=argparse.SUPPRESS, help=help)
    else:
        metavar = _kind_name(leaf.kind).upper() + ("|none" if leaf.optional else "")
        parser.add_argument(*flags, dest=leaf.name, type=_parse_value(leaf), metavar=metavar,
                            default=argparse.SUPPRESS, help=help)


class _Values(argparse.Action):
    """A list flag's values as a tuple; `none` alone (an optional field) is None."""

    def __call__(self, parser, namespace, values, option_string=None):
        if None in values and len(values) > 1:
            raise argparse.ArgumentError(self, "'none' stands alone: no list, or a list of values")
        setattr(namespace, self.dest, None if None in values else tuple(values))


class _TRLFlag(argparse.Action):
    """A TRL flag with no meaning here: its value is taken where it is our fixed one, else refused saying why."""

    def __call__(self, parser, namespace, values, option_string=None):
        why = trl_names.refusal(option_string[2:], values)
        if why is not None:
            raise argparse.ArgumentError(self, why)


class _TRLMicroBatch(argparse.Action):
    """TRL's --per_device_train_batch_size: our batch size, marked to be multiplied by gradient_accumulation_steps."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        namespace.trl_micro_batch = self.dest


def renamed(cls: type) -> dict[str, str]:
    """{old flat name: new flat name} of the settings `cls` has renamed."""
    return dict(getattr(cls, "RENAMED", {}))


def _renamed_warning(old: str, new: str, where: str) -> None:
    warnings.warn(f"{where}: {old!r} is now {new!r}; the old name still works, for now", FutureWarning,
                  stacklevel=2)


class _RenamedFlag(argparse.Action):
    """An old flag's value stored under its new name, with a warning."""

    def __call__(self, parser, namespace, values, option_string=None):
        new = "--" + self.dest.replace("_", "-")
        _renamed_warning(option_string, new, "flag")
        setattr(namespace, self.dest, values)


# -- files ------------------------------------------------------------------------------------------------


def load_config_file(path) -> ConfigValues:
    """The mapping in a YAML (.yaml, .yml) or JSON file; a ValueError naming the file when it is missing, does
    not parse or does not hold a mapping."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such config file")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            values = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not valid YAML: {e}") from None
    elif path.suffix.lower() == ".json":
        try:
            values = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    else:
        raise ValueError(f"{path}: a config file must be .yaml, .yml or .json, got {path.suffix!r}")
    if values is None:  # an empty YAML file
        values = {}
    if not isinstance(values, dict):
        raise ValueError(f"{path}: a config file must hold a mapping of settings, got a {type(values).__name__}")
    return ConfigValues(values, str(path))


# -- flags, file and defaults into one config ----------------------------------------------------------------


def _check_value(leaf: FlatField, value: Any, where: str) -> Any:
    """A file's value for `leaf`, type-checked (an int for a float field becomes a float; a list field's value is a
    list, each item checked)."""
    if value is None and leaf.optional:
        return None
    if leaf.many:
        if not isinstance(value, list) or not value:
            raise ValueError(f"{where} must be {leaf.type_name}, got {type(value).__name__} {value!r}")
        item = dataclasses.replace(leaf, many=False, optional=False)
        return tuple(_check_value(item, v, f"{where}, item {i}") for i, v in enumerate(value))
    ok = isinstance(value, leaf.kind) and not (leaf.kind is not bool and isinstance(value, bool))
    if leaf.kind is torch.dtype:
        ok = isinstance(value, str)  # a name, parsed by the config dataclass
    if leaf.kind is float and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            ok = False
    if not ok:
        raise ValueError(f"{where} must be {leaf.type_name}, got {type(value).__name__} {value!r}")
    return value


def _unknown(key: str, valid: list[str], where: str) -> ValueError:
    close = difflib.get_close_matches(key.replace("-", "_"), valid, n=1, cutoff=0.5)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ValueError(f"{where}: unknown key {key!r}{hint}; valid keys: {', '.join(sorted(valid))}")


def _flatten(mapping: Mapping, prefix: tuple[str, ...], leaves: list[FlatField], where: str,
             also: Iterable[str] = ()) -> dict[str, Any]:
    """{leaf name: checked value} of one mapping of a config file at `prefix` (() for the top level, where any
    leaf may also be given by its flat name). `also`: other keys the file may hold there (named when a key is
    unknown)."""
    groups = {leaf.path[:i] for leaf in leaves for i in range(1, len(leaf.path))}
    here = {leaf.path[len(prefix)]: leaf for leaf in leaves if leaf.path[:len(prefix)] == prefix}
    flat = {leaf.name: leaf for leaf in leaves} if not prefix else {}
    valid = sorted(set(here) | set(flat) | set(also))
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        name = str(key).replace("-", "_")
        if prefix + (name,) in groups:
            if not isinstance(value, Mapping):
                raise ValueError(f"{where}: {key!r} must be a mapping of its fields, got {type(value).__name__}")
            found = _flatten(value, prefix + (name,), leaves, f"{where}, {key}")
        elif name in here or name in flat:
            leaf = flat.get(name) or here[name]
            found = {leaf.name: _check_value(leaf, value, f"{where}: {key!r}")}
        else:
            raise _unknown(str(key), valid, where)
        twice = set(found) & set(out)
        if twice:
            raise ValueError(f"{where}: {sorted(twice)} given twice (flat and nested)")
        out.update(found)
    return out


def file_settings(cls: type, file_values: Mapping, section: str | None, source: str,
                  skip: Iterable[str] = (), also: Iterable[str] = ()) -> dict[str, Any]:
    """{leaf name: value} of a config file for `cls`: its top-level keys, then its `section` over them.
    The other commands' sections are left for their commands. `also`: the command's other top-level keys (its
    run settings, taken out of file_values before), named when a key is unknown."""
    leaves, names = flat_fields(cls, skip), renamed(cls)
    trl = trl_names.aliases(leaf.name for leaf in leaves)
    top = {k: v for k, v in file_values.items() if not (k in SECTIONS and isinstance(v, Mapping))}
    out = _flatten(_file_keys(top, names, trl, source), (), leaves, source, also)
    if section is not None and isinstance(file_values.get(section), Mapping):
        where = f"{source}, section {section!r}"
        out.update(_flatten(_file_keys(file_values[section], names, trl, where), (), leaves, where))
    return out


def _file_keys(mapping: Mapping, names: dict[str, str], trl: dict[str, str], where: str) -> dict:
    """A mapping of a config file with every key under our name: renamed settings' old names (warned), TRL's names;
    TRL's settings at our fixed value dropped, and those with no meaning here refused."""
    mapping = trl_names.take_fixed(trl_names.micro_batch_keys(mapping), where)
    return _renamed_keys(_renamed_keys(mapping, trl, where, warn=False), names, where)


def _renamed_keys(mapping: Mapping, names: dict[str, str], where: str, warn: bool = True) -> dict:
    """`mapping` with the keys in `names` replaced by their names here: a renamed setting's old name (warned), or
    (warn False) another spelling of it, TRL's."""
    out = {}
    for key, value in mapping.items():
        name = str(key).replace("-", "_")
        if name in names:
            if names[name] in mapping or names[name].replace("_", "-") in mapping:
                kind = "the old and the new name" if warn else "TRL's name and ours"
                raise ValueError(f"{where}: {key!r} and {names[name]!r} are one setting ({kind}); give it once")
            if warn:
                _renamed_warning(str(key), names[name], where)
            key = names[name]
        out[key] = value
    return out


def _instantiate(cls: type, values: dict[tuple[str, ...], Any], prefix: tuple[str, ...] = ()):
    hints, kwargs = typing.get_type_hints(cls), {}
    for f in dataclasses.fields(cls):
        path = prefix + (f.name,)
        if dataclasses.is_dataclass(hints[f.name]) and any(p[:len(path)] == path for p in values):
            kwargs[f.name] = _instantiate(hints[f.name], values, path)
        elif path in values:
            kwargs[f.name] = values[path]
    return cls(**kwargs)


def build_config(cls: type, args: argparse.Namespace | None, file_values: Mapping | None = None,
                 section: str | None = None, source: str | None = None, skip: Iterable[str] = (),
                 also: Iterable[str] = ()):
    """An instance of config dataclass `cls`: each field from its explicit flag in `args` (add_config_args), else
    from `file_values` (load_config_file; its `section` over its top-level keys), else the dataclass default;
    the dataclasses' own __post_init__ checks run. `source` names the file in errors (by default the path
    load_config_file recorded). Fields in `skip` are neither flags nor file keys; `also` are the command's other
    keys, for the error on an unknown one."""
    leaves = flat_fields(cls, skip)
    source = source or getattr(file_values, "path", "the config file")
    settings = file_settings(cls, file_values or {}, section, source, skip, also)
    given = vars(args) if args is not None else {}
    settings.update({leaf.name: given[leaf.name] for leaf in leaves if leaf.name in given})
    micro = given.get("trl_micro_batch")
    if micro in settings:  # TRL's per_device_train_batch_size: a micro-batch
        settings[micro] *= settings.get("gradient_accumulation_steps", 1)
    by_name = {leaf.name: leaf.path for leaf in leaves}
    return _instantiate(cls, {by_name[name]: value for name, value in settings.items()})
