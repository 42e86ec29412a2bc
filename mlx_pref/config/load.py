"""Reading a Config: YAML files and flag overrides, foreign vocabularies (TRL's, Soup's)
mapped in, loose types made exact, every unknown key reported at once with the key most
likely meant, and relative paths explained."""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from mlx_pref.config.schema import LORA_ALIASES, Config, LoraConfig
from mlx_pref.config.vocab import translate
from mlx_pref.errors import ConfigError, suggest
from mlx_pref.losses import REGISTRY


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(hint: Any) -> str:
    args = typing.get_args(hint)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args if a is not type(None)) + (
            " or null" if type(None) in args else ""
        )
    if origin is list:
        return f"a list of {_type_name(args[0])}"
    if origin is dict:
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false"}.get(
        hint, getattr(hint, "__name__", str(hint))
    )


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Check ``value`` against a type hint, converting where YAML/flags are loose (int -> float)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError:
                continue
    elif origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, (list, tuple)):
            return [_coerce(key, v, args[0]) for v in value]
    elif origin is dict:
        if isinstance(value, dict):
            return {str(k): _coerce(f"{key}.{k}", v, args[1]) for k, v in value.items()}
    elif hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML reads 1e-4 as a string
            except ValueError:
                pass
    elif hint is str and isinstance(value, str):
        return value
    raise ConfigError(f"{key} must be {_type_name(hint)}, got {value!r}")


def _hint(key: str, valid: list[str]) -> str:
    close = suggest(key, valid)
    if close:
        return f"did you mean '{close}'?"
    if len(valid) <= 12:
        return f"valid keys: {', '.join(sorted(valid))}"
    return ""


def unknown_keys_error(unknown: list[tuple[str, list[str], str]]) -> ConfigError:
    """One error naming every unknown key, each with the key most likely meant.

    ``unknown`` holds (key, valid keys, where: "" or "lora " or "loss parameter ")."""
    if len(unknown) == 1:
        key, valid, where = unknown[0]
        hint = _hint(key, valid)
        if hint:
            return ConfigError(f"unknown {where}key '{key}'; {hint}")
        return ConfigError(
            f"unknown {where}key '{key}' (the README's configuration reference lists every key)"
        )
    parts = []
    for key, valid, where in unknown:
        hint = _hint(key, valid)
        parts.append(f"{where}'{key}'" + (f" ({hint})" if hint.startswith("did") else ""))
    return ConfigError(f"unknown keys: {', '.join(parts)}")


def _build_lora(raw: Any) -> LoraConfig:
    if raw is None:
        return LoraConfig()
    if isinstance(raw, LoraConfig):
        return raw
    hints = _field_types(LoraConfig)
    kwargs = {}
    for key, value in raw.items():
        name = LORA_ALIASES.get(key, key)
        kwargs[name] = _coerce(f"lora.{name}", value, hints[name])
    return LoraConfig(**kwargs)


def loss_parameter_defaults() -> dict[str, Any]:
    """Every registered loss's own parameters (a name shared by losses keeps its first default)."""
    out: dict[str, Any] = {}
    for spec in REGISTRY.values():
        for key, default in spec.params.items():
            out.setdefault(key, default)
    return out


def find_unknown_keys(raw: dict[str, Any]) -> list[tuple[str, list[str], str]]:
    """Every key of ``raw`` that is not a Config key, a LoRA key or a loss parameter."""
    hints = [k for k in _field_types(Config) if k != "notes"]
    params = loss_parameter_defaults()
    lora_keys = list(_field_types(LoraConfig))
    unknown = []
    for key, value in raw.items():
        if key == "lora" and isinstance(value, dict):
            unknown += [
                (k, lora_keys, "lora ") for k in value if LORA_ALIASES.get(k, k) not in lora_keys
            ]
        elif key == "loss_params" and isinstance(value, dict):
            unknown += [(k, list(params), "loss parameter ") for k in value if k not in params]
        elif key not in hints and key not in params:
            unknown.append((key, [*hints, *params], ""))
    return unknown


def vocabulary() -> set[str]:
    """Every top-level key mlx-pref reads: Config fields and loss parameters."""
    return {*_field_types(Config), *loss_parameter_defaults()} - {"notes"}


def config_from_dict(
    raw: dict[str, Any], notes: list[str] | None = None, problems: list[str] | None = None
) -> Config:
    """Build and validate a Config from plain values (a parsed YAML file plus overrides).

    Foreign keys (TRL's, Soup's) are translated first (``vocab.translate``); ``notes`` and
    ``problems`` come from a translation done earlier (``load_config`` translates the file
    before the flags apply). Keys with no counterpart and unknown keys are one error.
    """
    hints = _field_types(Config)
    loss_params = loss_parameter_defaults()
    raw, found, trouble = translate(raw, vocabulary())
    notes, problems = [*(notes or []), *found], [*(problems or []), *trouble]
    unknown = find_unknown_keys(raw)
    if unknown or problems:
        messages = [*problems, *([str(unknown_keys_error(unknown))] if unknown else [])]
        raise ConfigError("; ".join(messages))
    kwargs: dict[str, Any] = {"loss_params": {}}
    for key, value in raw.items():
        if key == "lora":
            if not (value is None or isinstance(value, (dict, LoraConfig))):
                raise ConfigError(f"lora must be a mapping like {{r: 8, alpha: 16}}, got {value!r}")
            kwargs["lora"] = _build_lora(value)
        elif key == "loss_params":
            kwargs["loss_params"].update(value or {})
        elif key in loss_params:
            kwargs["loss_params"][key] = value
        else:
            kwargs[key] = _coerce(key, value, hints[key])
    loss = kwargs.get("loss")
    if isinstance(loss, str) and "," in loss:  # `--loss dpo,ipo,simpo` is a sweep
        kwargs["sweep"] = [name.strip() for name in loss.split(",") if name.strip()]
        kwargs["loss"] = kwargs["sweep"][0]
    for key, value in kwargs["loss_params"].items():
        default = loss_params[key]
        if value is not None and default is not None and not isinstance(default, str):
            kwargs["loss_params"][key] = _coerce(key, value, type(default))
    return Config(**kwargs, notes=notes).validate()


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file; syntax errors name the file, line and column."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{where}: invalid YAML: {problem}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason})") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the config must be a mapping of keys to values")
    return raw


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Overrides win; a dotted key ``lora.r`` sets one nested value."""
    out = dict(base)
    for key, value in overrides.items():
        if "." in key:
            head, tail = key.split(".", 1)
            nested = out.get(head) or {}
            if isinstance(nested, LoraConfig):
                nested = dataclasses.asdict(nested)
            out[head] = merge(dict(nested), {tail: value})
        else:
            out[key] = value
    return out


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """The one way to get a Config: YAML file (optional), then overrides (flags)."""
    raw = read_yaml(path) if path else {}
    where = f"{path}: " if path else ""
    try:
        # The file's own vocabulary first, then the flags (ours) override it.
        mapped, notes, problems = translate(raw, vocabulary())
        config = config_from_dict(merge(mapped, overrides or {}), notes, problems)
    except ConfigError as exc:
        raise ConfigError(f"{where}{exc}") from None
    if path:
        _check_relative_paths(config, mapped, overrides or {}, Path(path))
    return config


PATH_KEYS = ("model", "data", "eval_data", "adapter", "ref_model")


def _check_relative_paths(config: Config, raw: dict, overrides: dict, path: Path) -> None:
    """Relative paths in a config file resolve from the working directory, as flags do;
    one that only exists beside the config file gets an error saying so."""
    for key in PATH_KEYS:
        value = getattr(config, key)
        if key in overrides or key not in raw or not isinstance(value, str):
            continue
        local = Path(value).expanduser()
        beside = path.parent / local
        if not local.is_absolute() and not local.exists() and beside.exists():
            raise ConfigError(
                f"{path}: {key}: {value} does not exist in the working directory ({Path.cwd()}), "
                f"which relative paths are read from; it is beside the config: write {beside} "
                "or run from there"
            )


def rewrite_config(path: str | Path) -> tuple[str, list[str]]:
    """A config file in another trainer's vocabulary (TRL's, Soup's) as the equivalent
    mlx-pref YAML, checked the way ``load_config`` checks it, and what was mapped."""
    raw = read_yaml(path)
    try:
        mapped, notes, problems = translate(raw, vocabulary())
        config_from_dict(mapped, notes, problems)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    lines = [f"# mlx-pref config written from {path}"]
    lines += [f"# {note}" for note in notes] or ["# (it already used mlx-pref's names)"]
    return "\n".join(lines) + "\n" + yaml.safe_dump(mapped, sort_keys=False), notes
