"""Settings from `pyproject.toml` and `--threshold` options.

Thresholds live under `[tool.vqdoctor.thresholds.<rule-id>]` in the `pyproject.toml` of the
current directory::

    [tool.vqdoctor.thresholds.dead-codes]
    warn_fraction = 0.3

and on the command line as `--threshold dead-codes.warn_fraction=0.3` (a rule may be named by
id or code). Command-line values win. Values are checked against the rule's threshold names and
converted to the type of their defaults, so a typo fails fast with one line (exit 2).

The CI gate's thresholds live under `[tool.vqdoctor.gate]`, with per-quantizer tables keyed by
an fnmatch pattern of the quantizer's name (values are checked by `vqdoctor.gate`)::

    [tool.vqdoctor.gate]
    min_perplexity = "5%"
    min_usage = 0.25

    [tool.vqdoctor.gate.quantizers."quantizer.layers.*"]
    min_usage = 0.1
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vqdoctor.errors import ConfigError

if TYPE_CHECKING:
    from vqdoctor.rules.base import Rule

try:  # Python >= 3.11
    import tomllib as _toml
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    try:
        import tomli as _toml  # type: ignore[no-redef]
    except ModuleNotFoundError:
        _toml = None  # type: ignore[assignment]

PYPROJECT = "pyproject.toml"

Thresholds = dict[str, dict[str, Any]]
"""Threshold overrides by rule id, then threshold name."""


@dataclasses.dataclass(frozen=True)
class Config:
    """vqdoctor settings read from a `pyproject.toml`.

    Attributes:
        path: the file read, or None when there was none (or it could not be parsed).
        settings: the whole `[tool.vqdoctor]` table, for commands that read more than thresholds.
        thresholds: `[tool.vqdoctor.thresholds]`, keyed as written (rule id or code).
        gate: `[tool.vqdoctor.gate]`, as written (a `quantizers` key holds the per-pattern tables).
        notes: things the user should know (e.g. the file was ignored), one line each.
    """

    path: Path | None = None
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)
    thresholds: Thresholds = dataclasses.field(default_factory=dict)
    gate: dict[str, Any] = dataclasses.field(default_factory=dict)
    notes: tuple[str, ...] = ()


def load_config(directory: str | Path | None = None) -> Config:
    """Read `[tool.vqdoctor]` from `pyproject.toml` in `directory` (default: the current one).

    A missing file or a file without the table gives an empty `Config`. On Python 3.10 without
    `tomli` the file is ignored, with a note.

    Raises:
        ConfigError: the file is not valid TOML, or the thresholds or gate table is malformed.
    """
    path = Path(directory or ".") / PYPROJECT
    if not path.is_file():
        return Config()
    if _toml is None:  # pragma: no cover - Python 3.10 without tomli
        return Config(notes=(f"{path}: ignored (reading it needs Python >= 3.11 or tomli)",))
    try:
        data = _toml.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read: {e}", path=str(path)) from e
    except _toml.TOMLDecodeError as e:
        raise ConfigError(f"invalid TOML: {e}", path=str(path)) from e
    settings = data.get("tool", {}).get("vqdoctor", {})
    if not isinstance(settings, dict):
        raise ConfigError("[tool.vqdoctor] must be a table", path=str(path))
    raw = settings.get("thresholds", {})
    if not isinstance(raw, dict) or not all(isinstance(v, dict) for v in raw.values()):
        raise ConfigError("[tool.vqdoctor.thresholds] must hold one table per rule, e.g. "
                          "[tool.vqdoctor.thresholds.dead-codes]", path=str(path))
    gate = settings.get("gate", {})
    quantizers = gate.get("quantizers", {}) if isinstance(gate, dict) else None
    if not isinstance(gate, dict) or not isinstance(quantizers, dict) \
            or not all(isinstance(v, dict) for v in quantizers.values()):
        raise ConfigError("[tool.vqdoctor.gate] must be a table, with one table per quantizer "
                          'pattern, e.g. [tool.vqdoctor.gate.quantizers."quantizer.*"]',
                          path=str(path))
    return Config(path=path, settings=settings, thresholds={k: dict(v) for k, v in raw.items()},
                  gate=dict(gate))


def parse_threshold_options(values: Sequence[str]) -> Thresholds:
    """Parse `RULE.NAME=VALUE` options into {rule: {name: "VALUE"}} (values stay strings).

    Raises:
        ConfigError: an option is not of the form RULE.NAME=VALUE.
    """
    out: Thresholds = {}
    for text in values:
        key, sep, value = text.partition("=")
        rule_key, dot, name = key.strip().rpartition(".")
        if not sep or not dot or not rule_key or not name or not value.strip():
            raise ConfigError(f"--threshold {text!r}: expected RULE.NAME=VALUE, "
                              "e.g. dead-codes.warn_fraction=0.3")
        out.setdefault(rule_key, {})[name.strip()] = value.strip()
    return out


def _coerce(value: Any, default: Any, where: str) -> Any:
    """Convert `value` (a TOML value or an option string) to the type of `default`."""
    is_text = isinstance(value, str)
    try:
        if isinstance(default, bool):
            if isinstance(value, bool):
                return value
            if is_text and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
                return value.lower() in ("true", "yes", "on", "1")
            raise ValueError("expected true or false")
        if isinstance(default, int):
            if isinstance(value, bool) or isinstance(value, float):
                raise ValueError("expected an integer")
            return int(value)
        if isinstance(default, float):
            if isinstance(value, bool):
                raise ValueError("expected a number")
            f = float(value)
            if math.isnan(f):
                raise ValueError("expected a number, not NaN")
            return f
        if isinstance(default, (tuple, list)):
            items = value.split(",") if is_text else list(value)
            kind = type(default[0]) if default else str
            items = [_coerce(x.strip() if isinstance(x, str) else x, kind(), where) for x in items]
            return type(default)(items)
        if isinstance(default, str):
            return str(value)
        if default is None and is_text:  # optional threshold without a typed default
            for conv in (int, float):
                try:
                    return conv(value)
                except ValueError:
                    pass
        return value
    except (TypeError, ValueError) as e:
        kinds = {bool: "true or false", int: "an integer", float: "a number"}
        msg = str(e) if str(e).startswith("expected") else (
            f"expected {kinds.get(type(default), 'a ' + type(default).__name__)}")
        raise ConfigError(f"threshold {where}: {msg}, got {value!r}") from None


def rule_id(key: str, rules: Mapping[str, Rule]) -> str:
    """The rule id for `key`, a rule id or code (codes case-insensitive).

    Raises:
        ConfigError: no such rule.
    """
    if key in rules:
        return key
    for rid, r in rules.items():
        if r.spec.code.lower() == key.lower():
            return rid
    raise ConfigError(f"unknown rule {key!r} in thresholds; known: {', '.join(rules) or 'none'}")


def resolve_thresholds(layers: Sequence[Mapping[str, Mapping[str, Any]]],
                       rules: Mapping[str, Rule] | None = None) -> Thresholds:
    """Merge threshold layers (later ones win) into {rule id: {name: typed value}}.

    Args:
        layers: e.g. `[config.thresholds, parse_threshold_options(cli_values)]`.
        rules: the rule registry (default: `vqdoctor.rules.registry()`).

    Raises:
        ConfigError: unknown rule or threshold name, or a value of the wrong type.
    """
    if rules is None:
        from vqdoctor.rules import registry

        rules = registry()
    out: Thresholds = {}
    for layer in layers:
        for key, values in layer.items():
            rid = rule_id(str(key), rules)
            defaults = rules[rid].thresholds()
            for name, value in values.items():
                if name not in defaults:
                    raise ConfigError(f"unknown threshold {rid}.{name}; known: "
                                      f"{', '.join(f'{rid}.{n}' for n in defaults) or 'none'}")
                out.setdefault(rid, {})[name] = _coerce(value, defaults[name], f"{rid}.{name}")
    return out


__all__ = ["PYPROJECT", "Config", "Thresholds", "load_config", "parse_threshold_options",
           "resolve_thresholds", "rule_id"]
