"""Methods as the trainer sees them: the baselines (full, head, last-layers) plus every config class registered in
``deltatune.methods.METHODS``, whose dataclass fields become command-line options (``--r 8 --targets query,value``)
converted from text by the field's type hint. Nothing here is method-specific, so newly registered methods appear
automatically."""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from pathlib import Path
from typing import Any

from ..config import DeltaConfig, config_from_peft_dict
from ..errors import ConfigError
from ..methods import METHODS

BASELINES = ("full", "head", "last-layers")
BASELINE_LR = {"full": 5e-5, "last-layers": 1e-4, "head": 2e-3}
PEFT_LR = 3e-3
# fields every config has that the trainer fills in itself
HIDDEN_FIELDS = {"extra", "base_model_name_or_path", "task_type", "inference_mode"}
_REGEX_CHARS = set("*+?()[]^$|\\{}")


def all_methods() -> list[str]:
    return [*BASELINES, *METHODS]


def check_method(name: str) -> str:
    if name in BASELINES or name in METHODS:
        return name
    close = difflib.get_close_matches(name, all_methods(), n=3, cutoff=0.5)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise ConfigError(f"unknown method '{name}'{hint}; choose from {', '.join(all_methods())}")


def default_lr(method: str) -> float:
    if method in BASELINE_LR:
        return BASELINE_LR[method]
    return float(getattr(METHODS[method], "default_lr", PEFT_LR))


def method_fields(cls: type[DeltaConfig]) -> dict[str, Any]:
    """Field name -> resolved type hint for the user-settable fields of a config class."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, str) for f in dataclasses.fields(cls) if f.init and f.name not in HIDDEN_FIELDS}


def option_table() -> dict[str, list[str]]:
    """Every method option name -> the registered methods that have it (in registry order)."""
    table: dict[str, list[str]] = {}
    for method, cls in METHODS.items():
        for name in method_fields(cls):
            table.setdefault(name, []).append(method)
    return table


# ---- text -> typed values ----------------------------------------------------------------------------------------
def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true/false, got {text!r}")


def _split_list(text: str) -> list[str]:
    text = text.strip()
    if text.startswith("["):
        value = json.loads(text)
        if not isinstance(value, list):
            raise ValueError("expected a JSON list")
        return [str(v) if not isinstance(v, str) else v for v in value]
    return [part.strip() for part in text.split(",") if part.strip()]


def _int_list(text: str) -> list[int]:
    out: list[int] = []
    for part in _split_list(text):
        first, dash, last = part.partition("-")
        if dash and first.strip().isdigit() and last.strip().isdigit():
            out.extend(range(int(first), int(last) + 1))
        else:
            out.append(int(part))
    return out


def convert(text: str, hint: Any) -> Any:
    """Convert command-line ``text`` to a value of type ``hint`` (int, float, bool, str, list[...], dict, Literal,
    unions with None). For ``list[str] | str`` a comma list or plain name becomes a list, while ``all-linear`` and
    strings with regex characters stay a string."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        members = [a for a in args if a is not type(None)]
        if type(None) in args and text.strip().lower() in ("none", "null"):
            return None
        has_str = str in members
        lists = [m for m in members if typing.get_origin(m) is list]
        if has_str and lists:
            prefer_str = text == "all-linear" or bool(_REGEX_CHARS & set(text))
            others = [m for m in members if m is not str and m not in lists]
            members = [str, *lists, *others] if prefer_str else [*lists, *others, str]
        else:
            members = sorted(members, key=lambda m: m is str)  # str accepts anything: try it last
        errors = []
        for member in members:
            try:
                return convert(text, member)
            except (ValueError, TypeError, json.JSONDecodeError) as error:
                errors.append(str(error))
        raise ValueError("; ".join(errors))
    if origin is typing.Literal:
        for choice in args:
            if str(choice) == text:
                return choice
        raise ValueError(f"expected one of {', '.join(map(str, args))}")
    if hint is bool:
        return _parse_bool(text)
    if hint is int:
        return int(text)
    if hint is float:
        return float(text)
    if hint is str or hint is Any:
        return text
    if origin is list or hint is list:
        item = args[0] if args else str
        if item is int:
            return _int_list(text)
        return [convert(part, item) for part in _split_list(text)]
    if origin is tuple:
        item = args[0] if args else str
        return tuple(convert(part, item) for part in _split_list(text))
    if origin is dict or hint is dict:
        value = json.loads(text)
        if not isinstance(value, dict):
            raise ValueError("expected a JSON object such as '{\"query\": 4}'")
        return value
    raise ValueError(f"cannot read a value of type {hint} from the command line; use --config FILE")


# ---- config files ------------------------------------------------------------------------------------------------
def read_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML or JSON mapping (by extension; YAML needs pyyaml)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ConfigError(f"reading {path.name} needs pyyaml (pip install pyyaml), or write the config as JSON") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise ConfigError(f"{path} is not valid YAML: {error}") from error
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ConfigError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of option names to values")
    return data


def method_from_file(data: dict[str, Any]) -> str | None:
    """The method a config file names (``method: lora``, or a PEFT ``peft_type``)."""
    if "method" in data:
        return str(data["method"])
    if "peft_type" in data:
        return type(config_from_peft_dict(data)).method or None
    return None


# ---- building a config -------------------------------------------------------------------------------------------
def build_config(
    method: str,
    options: dict[str, str] | None = None,
    file_values: dict[str, Any] | None = None,
    strict: bool = True,
) -> DeltaConfig:
    """The ``DeltaConfig`` of ``method`` from config-file values (already typed) overridden by command-line text.

    ``strict``: an option the method does not have is an error (``train``); otherwise it is skipped (``compare``
    applies one option set to several methods).
    """
    cls = METHODS[check_method(method)] if method not in BASELINES else None
    if cls is None:
        raise ConfigError(f"'{method}' is a baseline, not an adapter method; it has no adapter config")
    fields = method_fields(cls)
    values: dict[str, Any] = {}
    if file_values:
        data = {k.replace("-", "_"): v for k, v in file_values.items() if k != "method"}
        if "peft_type" in file_values:
            config = config_from_peft_dict(file_values)
            values = {f: getattr(config, f) for f in fields}
        else:
            unknown = sorted(set(data) - set(fields))
            if unknown:
                raise ConfigError(f"config file has options {unknown} that method '{method}' does not have; its options: {', '.join(fields)}")
            values.update(data)
    for name, text in (options or {}).items():
        if name not in fields:
            if strict:
                raise ConfigError(
                    f"option --{name.replace('_', '-')} does not apply to method '{method}'; its options: "
                    f"{', '.join('--' + f.replace('_', '-') for f in fields)}"
                )
            continue
        try:
            values[name] = convert(str(text), fields[name])
        except (ValueError, TypeError, json.JSONDecodeError) as error:
            raise ConfigError(f"--{name.replace('_', '-')} {text!r} is not valid for method '{method}': {error}") from error
    try:
        return cls(**values)
    except ConfigError:
        raise
    except (TypeError, ValueError) as error:
        raise ConfigError(f"invalid options for method '{method}': {error}") from error
