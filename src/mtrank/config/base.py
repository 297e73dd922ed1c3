"""Typed configuration: dataclasses built from plain data (YAML, JSON, dicts) or from Python, checked once.

Every config class is a dataclass deriving :class:`Config`. One builder, :func:`build`, turns plain data into
it and one checker, :meth:`Config.validate`, checks a Python-built one, so YAML and Python build alike:

* an unknown key is an error with a did-you-mean hint (``train.lr_rate: unknown field; did you mean 'lr'?``);
* every value is checked against its field's type annotation: ``int``, ``float`` (``1e-3``, which YAML reads
  as a string, is a number; ``epochs: ten`` is ``train.epochs: expected an integer, got 'ten'``), ``bool``,
  ``str``, ``Literal[...]`` choices, ``list[...]`` (a lone number where a list of numbers is expected is a
  list of one: ``hidden: 32`` is ``[32]``; anything else that is not a list is an error), ``X | None`` and
  nested config classes;
* a nested section may be given as a mapping, or as a string naming its ``type`` (``experts: dcn``);
* a section whose class has a :class:`Registry` (expert and gate types) is built as the config class
  registered for its ``type``, so a registered part's own options are typed and checked too;
* each class states its own rules in :meth:`Config.check`; messages name the field by its full path
  (``model.experts.hidden[0]: layer width must be >= 1, got 0``).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar, Union

import yaml

C = TypeVar("C", bound="Config")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and what is expected."""


def did_you_mean(key: str, known: list[str]) -> str:
    """``"; did you mean 'x'?"`` for the closest known name, else the list of known names."""
    close = difflib.get_close_matches(str(key), known, n=1)
    return f"; did you mean {close[0]!r}?" if close else f"; expected one of {known}"


def check(ok: bool, path: str, message: str) -> None:
    """Raise :class:`ConfigError` ``"path: message"`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"{path}: {message}")


def join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


class Registry:
    """Named parts of one kind (expert types, gate types), each a module class with its own config class.

    ``@EXPERTS.register("dcn", DCNExpertConfig)`` on a module class makes ``experts: {type: dcn, ...}`` build
    a ``DCNExpertConfig`` (typed, checked) and the model build that module from it (``from_config``).

    Example:
        >>> reg = Registry("widget")
        >>> @reg.register("plain")
        ... class Plain:
        ...     pass
        >>> reg.names(), reg.module("plain") is Plain
        (['plain'], True)
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._modules: dict[str, type] = {}
        self._configs: dict[str, type] = {}

    def register(self, name: str, config: type | None = None):
        """Decorator: register a module class under ``name`` with its config class (default: the section's
        base config class, set by the registry's owner)."""

        def decorate(module_class: type) -> type:
            self._modules[name] = module_class
            if config is not None:
                self._configs[name] = config
            module_class.type_name = name
            return module_class

        return decorate

    def names(self) -> list[str]:
        return sorted(self._modules)

    def _known(self, name: str, path: str) -> None:
        if name not in self._modules:
            raise ConfigError(f"{path}: unknown {self.kind} {name!r}{did_you_mean(name, self.names())}")

    def module(self, name: str, path: str = "type") -> type:
        self._known(name, path)
        return self._modules[name]

    def config(self, name: str, default: type, path: str = "type") -> type:
        self._known(name, path)
        return self._configs.get(name, default)


@dataclasses.dataclass
class Config:
    """Base of every config dataclass (see the module docstring)."""

    registry: ClassVar[Registry | None] = None  # set on a section whose ``type`` selects a registered part
    shorthand: ClassVar[str | None] = None  # the field a bare string fills (``experts: dcn``, ``categorical: [city]``)
    moved: ClassVar[dict[str, str]] = {}  # old key -> where it lives now (for the unknown-key message)
    section: ClassVar[str] = ""  # the path of a top-level config in messages ("model", "train")

    def __post_init__(self) -> None:
        # a nested section given in Python as a mapping or a type name is built as from YAML
        hints = _hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (dict, str, list)) and _mentions_config(hints[f.name]):
                setattr(self, f.name, coerce(value, hints[f.name], f.name))

    def check(self, path: str) -> None:
        """This section's own rules (beyond types); raise :class:`ConfigError` naming ``path.field``."""

    def validate(self: C, path: str | None = None) -> C:
        """Check every field's type (coercing ``"1e-3"`` to a number, as the builder does) and every rule;
        messages name fields under ``path`` (default: the class's section, e.g. ``train``)."""
        path = self.section if path is None else path
        hints = _hints(type(self))
        for f in dataclasses.fields(self):
            setattr(self, f.name, coerce(getattr(self, f.name), hints[f.name], join(path, f.name)))
        self.check(path)
        return self

    @classmethod
    def from_dict(cls: type[C], data: Any, path: str | None = None) -> C:
        """Build and validate from plain data (a mapping, e.g. parsed YAML or JSON)."""
        return build(cls, data, cls.section if path is None else path)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data that :meth:`from_dict` reads back."""
        return dataclasses.asdict(self)


def build(cls: type[C], data: Any, path: str = "") -> C:
    """An instance of config class ``cls`` from plain data, every field type-checked, then validated."""
    if isinstance(data, Config):
        if cls.registry is not None:  # the config class registered for its type, e.g. DCNExpertConfig for "dcn"
            target = cls.registry.config(getattr(data, "type", ""), _section(cls), join(path, "type"))
            if type(data) is target:
                return data.validate(path)
        elif isinstance(data, cls):
            return data.validate(path)
        data = data.to_dict()
    if isinstance(data, str) and cls.shorthand:
        data = {cls.shorthand: data}
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path or cls.__name__}: expected a mapping, got {type(data).__name__} {data!r}"[:300])
    if cls.registry is not None:  # a registered part: its own config class, by type
        default = next(f.default for f in dataclasses.fields(cls) if f.name == "type")
        name = data.get("type", default)
        if not isinstance(name, str):
            raise ConfigError(f"{join(path, 'type')}: expected a name, got {name!r}")
        cls = cls.registry.config(name, _section(cls), join(path, "type"))
    known = _field_names(cls)
    for key in data:
        if key not in known and key in cls.moved:
            raise ConfigError(f"{join(path, str(key))}: moved to {join(path, cls.moved[key])}")
        if key not in known:
            raise ConfigError(f"{join(path, str(key))}: unknown field{did_you_mean(key, known)}")
    hints = _hints(cls)
    kwargs = {key: coerce(value, hints[key], join(path, key)) for key, value in data.items()}
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in kwargs and _required(f)]
    if missing:
        raise ConfigError(f"{join(path, missing[0])}: required field is missing")
    instance = cls(**kwargs)
    instance.check(path)
    return instance


def coerce(value: Any, annotation: Any, path: str) -> Any:
    """``value`` checked against (and, for numbers written as text, converted to) ``annotation``."""
    if annotation is Any:
        return value
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return coerce(value, option, path)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0])
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{path}: unknown {value!r}{did_you_mean(str(value), [str(a) for a in args])}")
        return value
    if origin is list:
        (item,) = args or (Any,)
        if isinstance(value, tuple):
            value = list(value)
        if item in (int, float) and not isinstance(value, (bool, list)) and _number(value) is not None:
            value = [value]  # ``hidden: 32`` is one layer of 32: a lone number is a list of one
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__} {value!r}{_list_hint(value)}"[:300])
        return [coerce(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__}")
        _, item = args or (Any, Any)
        return {k: coerce(v, item, f"{path}.{k}") for k, v in value.items()}
    if isinstance(annotation, type) and issubclass(annotation, Config):
        return build(annotation, value, path)
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        number = _number(value)
        if number is None or not math.isfinite(number) or number != int(number):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return int(number)
    if annotation is float:
        number = None if isinstance(value, bool) else _number(value)
        if number is None:
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(number)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {type(value).__name__} {value!r}")
        return value
    return value


def _list_hint(value: Any) -> str:
    """How to write ``value`` as a YAML list (``"a, b"`` -> ``[a, b]``)."""
    if isinstance(value, str):
        items = [v.strip() for v in value.split(",")] if "," in value else [value]
        shown = [v if _number(v) is not None else repr(v) for v in items]
        return f"; write a YAML list, e.g. [{', '.join(shown)}]"
    return ""


def _number(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        try:
            return float(value.strip())  # YAML 1.1 reads 1e-3 as a string
        except ValueError:
            return None
    return None


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _section(cls: type) -> type:
    """The base config class of a registered section (the class that sets ``registry``)."""
    return next(c for c in cls.__mro__ if "registry" in vars(c))


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _mentions_config(annotation: Any) -> bool:
    if isinstance(annotation, type) and issubclass(annotation, Config):
        return True
    return any(_mentions_config(a) for a in typing.get_args(annotation))


# ---------------------------------------------------------------------------------------------- YAML


def read_yaml(path: str | Path) -> Any:
    """Parse a YAML file; a missing file or bad YAML is a :class:`ConfigError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found (looked for {path.resolve()})")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None


def apply_overrides(raw: dict, overrides: dict[str, Any] | None) -> dict:
    """Set dotted keys (``{"train.epochs": 1, "model.experts.hidden": [32]}``) in parsed YAML, in place."""
    for key, value in (overrides or {}).items():
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {key}: {part!r} is not a section (it holds {child!r})")
            node = child
        node[parts[-1]] = value
    return raw
