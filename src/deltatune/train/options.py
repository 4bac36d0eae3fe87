"""Methods as the trainer sees them: the baselines (full, head, last-layers) plus every config class registered in
``deltatune.methods.METHODS``, whose dataclass fields become command-line options (``--r 8 --targets query,value``)
converted from text by the field's type hint. Nothing here is method-specific, so newly registered methods appear
automatically.

Stacks: ``lora+prefix`` trains one adapter per part (named after the part) on one model, all active together. An
unprefixed option (``--r 8``) goes to every part that has that field, ``--set PART.FIELD=VALUE`` to one part only
(it wins over the unprefixed form); ``modules_to_save`` goes to the first part that has it, so the head is trained
once. A config file for a stack maps part names to their options (``{"lora": {"r": 8}, "prefix": {...}}``)."""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from pathlib import Path
from typing import Any

from ..config import DeltaConfig
from ..errors import ConfigError
from ..methods import METHODS, config_from_peft_dict

BASELINES = ("full", "head", "last-layers")
BASELINE_LR = {"full": 5e-5, "last-layers": 1e-4, "head": 3e-2}
PEFT_LR = 3e-3
# fields every config has that the trainer fills in itself
HIDDEN_FIELDS = {"extra", "base_model_name_or_path", "task_type", "inference_mode"}
_REGEX_CHARS = set("*+?()[]^$|\\{}")
STACK_SEP = "+"
HEAD_FIELDS = {"modules_to_save"}  # unprefixed: first part only, so the head is trained once


def all_methods() -> list[str]:
    return [*BASELINES, *METHODS]


def check_method(name: str) -> str:
    if name in BASELINES or name in METHODS:
        return name
    close = difflib.get_close_matches(name, all_methods(), n=3, cutoff=0.5)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise ConfigError(f"unknown method '{name}'{hint}; choose from {', '.join(all_methods())}")


def method_parts(method: str) -> list[str]:
    """The registered methods of ``method``: ``lora+prefix`` -> ``[lora, prefix]``; a single method -> ``[method]``.
    Baselines cannot be stacked and no part may repeat."""
    if STACK_SEP not in method:
        return [check_method(method)]
    parts = [part.strip() for part in method.split(STACK_SEP)]
    if not all(parts):
        raise ConfigError(f"method '{method}' has an empty part; write the parts joined by '+', e.g. lora+prefix")
    for part in parts:
        check_method(part)
    baselines = [part for part in parts if part in BASELINES]
    if baselines:
        raise ConfigError(
            f"'{baselines[0]}' is a baseline and cannot be stacked in '{method}'; stack adapter methods only "
            f"({', '.join(METHODS)})"
        )
    repeated = sorted({part for part in parts if parts.count(part) > 1})
    if repeated:
        raise ConfigError(f"method '{method}' lists {', '.join(repeated)} twice; each part is one adapter, named after its method")
    return parts


def default_lr(method: str) -> float:
    """The method's default learning rate; for a stack the smallest of its parts'."""
    if STACK_SEP in method:
        return min(default_lr(part) for part in method_parts(method))
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
        except (yaml.YAMLError, RecursionError) as error:
            raise ConfigError(f"{path} is not valid YAML: {error or 'nested too deeply'}") from error
    else:
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as error:
            raise ConfigError(f"{path} is not valid JSON: {error or 'nested too deeply'}") from error
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of option names to values")
    return data


def method_from_file(data: dict[str, Any]) -> str | None:
    """The method a config file names (``method: lora``, a PEFT ``peft_type``, or, for a stack, its part
    sections in order: ``{"lora": {...}, "prefix": {...}}`` -> ``lora+prefix``)."""
    if "method" in data:
        return str(data["method"])
    if "peft_type" in data:
        return type(config_from_peft_dict(data)).method or None
    sections = [k for k, v in data.items() if k in METHODS and isinstance(v, dict)]
    return STACK_SEP.join(sections) or None


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


# ---- stacks: one config per part ---------------------------------------------------------------------------------
def _takers(name: str, parts: list[str]) -> list[str]:
    """The parts an unprefixed option goes to: every part with that field (``modules_to_save``: the first)."""
    takers = [p for p in parts if name in method_fields(METHODS[p])]
    return takers[:1] if name in HEAD_FIELDS else takers


def option_applies(key: str, parts: list[str]) -> bool:
    """Whether option ``key`` (``r`` or ``lora.r``) sets a field of some part of ``parts``."""
    part, dot, name = key.rpartition(".")
    if dot:
        return part in parts and name in method_fields(METHODS[part])
    return bool(_takers(key, parts))


def split_options(method: str, parts: list[str], values: dict[str, Any], strict: bool, source: str) -> dict[str, dict[str, Any]]:
    """``values`` (``r`` / ``lora.r`` keys) -> options per part; unprefixed ones first, so ``PART.FIELD`` wins."""
    per: dict[str, dict[str, Any]] = {part: {} for part in parts}
    for key, value in sorted(values.items(), key=lambda item: "." in item[0]):
        part, dot, name = key.rpartition(".")
        if dot:
            if part not in per:
                raise ConfigError(f"{source} '{key}': '{part}' is not a part of '{method}' (parts: {', '.join(parts)})")
            per[part][name] = value  # build_config checks that the part has the field
            continue
        takers = parts if len(parts) == 1 else _takers(key, parts)
        if not takers and strict:
            raise ConfigError(
                f"{source} '{key}' applies to none of the parts {', '.join(parts)} of '{method}'; set a part's field "
                f"with --set PART.FIELD=VALUE"
            )
        for taker in takers:
            per[taker][key] = value
    return per


def split_file(method: str, parts: list[str], data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Config-file values per part: a section per part name (``lora: {r: 8}``); other keys are spread like
    unprefixed options. A single method's file may also be flat (its fields, or a PEFT adapter_config.json)."""
    data = {k: v for k, v in data.items() if k != "method"}
    sections = {k: v for k, v in data.items() if k in parts and isinstance(v, dict)}
    if len(parts) == 1 and not sections:
        return {parts[0]: data}
    if "peft_type" in data:
        raise ConfigError(f"a config file for '{method}' maps each part to its options (or to a PEFT adapter config): "
                          f"{{{', '.join(repr(p) + ': {...}' for p in parts)}}}")
    rest = {k.replace("-", "_"): v for k, v in data.items() if k not in sections}
    per = split_options(method, parts, rest, True, "config file key")
    for part, values in sections.items():
        per[part].update(values)
    return per


def build_configs(
    method: str,
    options: dict[str, str] | None = None,
    file_values: dict[str, Any] | None = None,
    strict: bool = True,
) -> list[tuple[str, DeltaConfig]]:
    """(adapter name, config) per part of ``method``: ``[("default", config)]`` for a single method, one adapter
    named after each part for a stack (``[("lora", ...), ("prefix", ...)]``)."""
    parts = method_parts(method)
    if parts[0] in BASELINES:
        raise ConfigError(f"'{method}' is a baseline, not an adapter method; it has no adapter config")
    per_option = split_options(method, parts, dict(options or {}), strict, "option")
    per_file = split_file(method, parts, dict(file_values or {}))
    if len(parts) == 1:
        return [("default", build_config(parts[0], per_option[parts[0]], per_file[parts[0]], strict))]
    configs = []
    for part in parts:
        try:
            configs.append((part, build_config(part, per_option[part], per_file[part], True)))
        except ConfigError as error:
            raise ConfigError(f"part '{part}' of '{method}': {error} (an option without PART. goes to every part that "
                              f"has that field; --set PART.FIELD=VALUE sets one part only)") from error
    return configs
