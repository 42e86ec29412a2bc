"""Options several commands share: ``--set KEY=VALUE`` for any config key."""

from __future__ import annotations

from collections.abc import Callable

import click
import yaml

from mlx_pref.errors import ConfigError


def set_option(command: Callable) -> Callable:
    """``--set KEY=VALUE`` (repeatable): any config key, dotted for nested ones."""
    return click.option(
        "--set",
        "settings",
        multiple=True,
        metavar="KEY=VALUE",
        help="Set any config key (repeatable; dotted for nested keys: lora.alpha=32). "
        "VALUE is read as YAML: 3, 1e-4, true, [q_proj, v_proj]. Named flags win over it.",
    )(command)


def parse_settings(settings: tuple[str, ...] | list[str]) -> dict:
    """``["lora.alpha=32", "loss=ipo"]`` -> ``{"lora.alpha": 32, "loss": "ipo"}``; each value
    is a YAML scalar, list or mapping, as it would be written in a config file."""
    out = {}
    for item in settings:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: write KEY=VALUE, e.g. --set lora.alpha=32")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ConfigError(f"--set {key}: the value is not valid YAML ({problem})") from None
        out[key] = value
    return out
