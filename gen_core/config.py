"""Typed, validated configs: dataclasses + YAML presets + dotted `key=value` overrides.

A config is a dataclass whose fields are declared with `setting(default, doc, ...)`: the doc string
is shown by `wm <command> --help` and the bounds are checked on load. Loading goes
YAML file -> overrides -> type/bounds check -> dataclass instance; every mistake raises a
`ConfigError` whose one-line message names the key and what was expected.

    @dataclass
    class TrainConfig:
        epochs: int = setting(10, "passes over the data", min=1)
        lr: float = setting(1e-3, "Adam learning rate", min=0.0, min_inclusive=False)

    cfg = load_config(TrainConfig, "configs/x.yaml", ["epochs=3"])
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from gen_core.errors import UserError

T = TypeVar("T")
_MISSING = dataclasses.MISSING


class ConfigError(UserError):
    """A config key is unknown, mistyped or out of range."""


class Override(str):
    """A command-line value: the text as typed, plus its reading as YAML in `.parsed`.

    A string setting takes the text as typed (so `prompt=ROMEO:` stays "ROMEO:" instead of
    becoming a YAML mapping); every other setting takes the YAML reading (`3`, `true`, `[1, 2]`).
    """

    parsed: Any

    def __new__(cls, raw: str, parsed: Any) -> Override:
        obj = super().__new__(cls, raw)
        obj.parsed = parsed
        return obj


def setting(
    default: Any = _MISSING,
    doc: str = "",
    *,
    default_factory: Any = _MISSING,
    min: float | None = None,
    max: float | None = None,
    min_inclusive: bool = True,
    choices: tuple | None = None,
) -> Any:
    """Declare a config field with its documentation and bounds.

    Args:
        default: the default value (use `default_factory` for lists and nested configs).
        doc: one sentence shown in `--help` and written beside the resolved config.
        min, max: numeric bounds checked on load (`min_inclusive=False` makes min strict).
        choices: allowed values for a plain `str` field (use `Literal[...]` where possible).
    """
    meta = {"doc": doc, "min": min, "max": max, "min_inclusive": min_inclusive, "choices": choices}
    if isinstance(default, (list, dict, set)):
        value = default
        default_factory = lambda: type(value)(value)  # noqa: E731
        default = _MISSING
    if default_factory is not _MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


# ----------------------------------------------------------------------------------------------
# type checking


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is bool:
        return "true or false"
    if tp is str:
        return "a string"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin in (list, tuple):
        args = typing.get_args(tp)
        return f"a list of {_type_name(args[0]).removeprefix('a ').removeprefix('an ')}s"
    if dataclasses.is_dataclass(tp):
        return f"a mapping of {tp.__name__} settings"
    if origin is dict:
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Return `value` converted to type `tp`, or raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if isinstance(value, Override):
        return _coerce_override(value, tp, key)
    bad = ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if tp is Any:
        return _unwrap(value)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise bad
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise bad
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. run_name=42 on the command line
        raise bad
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise bad
        args = typing.get_args(tp)
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise bad
        return _unwrap(dict(value))
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise bad
        return from_dict(tp, value, prefix=f"{key}.")
    raise ConfigError(f"{key}: unsupported setting type {tp!r}")


def _coerce_override(value: Override, tp: Any, key: str) -> Any:
    """A command-line value: the typed text for string settings, its YAML reading otherwise."""
    if tp is str:
        return str(value)
    if typing.get_origin(tp) in (Union, types.UnionType) and str in typing.get_args(tp):
        if value.parsed is None and type(None) in typing.get_args(tp):
            return None  # key=null
        return str(value)
    return _coerce(value.parsed, tp, key)


def _unwrap(value: Any) -> Any:
    """Command-line values inside free-form mappings become their YAML readings."""
    if isinstance(value, Override):
        return value.parsed
    if isinstance(value, dict):
        return {k: _unwrap(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unwrap(v) for v in value]
    return value


def _check_bounds(value: Any, meta: typing.Mapping, key: str) -> None:
    lo, hi = meta.get("min"), meta.get("max")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if lo is not None:
            if meta.get("min_inclusive", True) and value < lo:
                raise ConfigError(f"{key}: expected a value >= {lo}, got {value!r}")
            if not meta.get("min_inclusive", True) and value <= lo:
                raise ConfigError(f"{key}: expected a value > {lo}, got {value!r}")
        if hi is not None and value > hi:
            raise ConfigError(f"{key}: expected a value <= {hi}, got {value!r}")
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f"{key}: expected one of {', '.join(map(repr, choices))}, got {value!r}")


def from_dict(cls: type[T], data: typing.Mapping[str, Any], prefix: str = "") -> T:
    """Build and validate a `cls` config from a plain mapping (e.g. parsed YAML)."""
    if not isinstance(data, typing.Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise ConfigError(
            f"{prefix}{unknown[0]}: unknown setting; expected one of {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, value in data.items():
        key = prefix + name
        value = _coerce(value, hints[name], key)
        _check_bounds(value, fields[name].metadata, key)
        kwargs[name] = value
    cfg = cls(**kwargs)
    validate = getattr(cfg, "validate", None)
    if callable(validate):
        try:
            validate()
        except ConfigError as err:
            if prefix and not str(err).startswith(prefix):
                raise ConfigError(prefix + str(err)) from None
            raise
    return cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain YAML-safe Python data (tuples become lists)."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(cfg)


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn `["a.b=3", "name=x"]` into the nested mapping `{"a": {"b": 3}, "name": "x"}`.

    Values are read as YAML scalars (so `3` is an int, `true` a bool, `[1, 2]` a list).
    """
    out: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{item}: expected key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"{item}: expected key=value with a non-empty dotted key")
        try:
            parsed = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            parsed = raw
        value = Override(raw, parsed)
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: {part} is set both as a value and as a section")
        node[parts[-1]] = value
    return out


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursively merge `update` into a copy of `base`."""
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with a one-line error for a missing or malformed file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(f"{path}: not valid YAML{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings at the top level")
    return data


def load_config(
    cls: type[T],
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    section: str | None = None,
    other_sections: tuple[str, ...] = (),
    ignored: tuple[str, ...] = (),
) -> T:
    """Load `cls` from an optional YAML file plus `key=value` overrides, validated.

    If `section` is given and the YAML file has a mapping under that key, the settings are read
    from there, with the file's top-level scalars (seed, run_name, ...) as shared defaults. This
    lets one pipeline file hold every stage's settings; the sections named in `other_sections`
    belong to other stages and are skipped, and so are the top-level keys in `ignored` (a
    pipeline file's shared sections and the pipeline's own settings) unless `cls` has them. Any
    other top-level key is refused, naming the file: a misspelt section or setting (`vea:`,
    `seeed: 5`) is an error, not silently ignored.
    """
    data: dict[str, Any] = {}
    if path is not None:
        data = read_yaml(path)
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        skipped = (set(other_sections) | set(ignored)) - {section}
        if section is not None:
            if section not in data and any(isinstance(data.get(o), dict) for o in other_sections):
                data = {**data, section: {}}  # a pipeline file without this stage's section
        sectioned = section is not None and isinstance(data.get(section), dict)
        allowed = names | skipped | ({section} if sectioned else set())
        for key in data:
            if key not in allowed:
                close = difflib.get_close_matches(str(key), sorted(allowed), n=1)
                raise ConfigError(
                    f"{path}: {key}: unknown top-level key (not a setting of this command"
                    + (", a stage's section or a pipeline setting" if skipped else "")
                    + ")"
                    + (f"; did you mean {close[0]}?" if close else "")
                )
        if sectioned:
            data = _select_section(cls, data, section)
        else:  # a flat file: this command's settings, perhaps beside other stages' sections
            data = {
                k: v
                for k, v in data.items()
                if k not in skipped
                or (k in names and not (k in other_sections and type(v) is dict))
            }
    data = merge(data, parse_overrides(overrides or []))
    return from_dict(cls, data)


def _select_section(cls: type, data: dict[str, Any], section: str) -> dict[str, Any]:
    """Settings for one stage from a file that may hold several stages' sections."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    # Shared: top-level scalars (seed, run_name) and top-level sections that are one of this
    # stage's nested configs (the `dream` settings every dreaming stage reads); the stage's own
    # section overrides both.
    shared = {
        k: v
        for k, v in data.items()
        if k in names
        and k != section
        and (not isinstance(v, dict) or dataclasses.is_dataclass(hints.get(k)))
    }
    return merge(shared, data[section])


def describe(cls: type, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, doc) for every setting of `cls`, for `--help`."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows.extend(describe(tp, prefix + f.name + "."))
            continue
        if f.default is not _MISSING:
            default = f.default
        elif f.default_factory is not _MISSING:
            default = f.default_factory()
        else:
            default = "(required)"
        rows.append(
            (
                prefix + f.name,
                yaml.safe_dump(to_dict(default), default_flow_style=True, width=10**6)
                .strip()
                .removesuffix("...")
                .strip(),
                f.metadata.get("doc", ""),
            )
        )
    return rows


def dump_yaml(cfg: Any) -> str:
    """The resolved config as YAML text (the form written into every run folder)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
