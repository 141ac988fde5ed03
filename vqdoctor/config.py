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
import fnmatch
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
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


# --- thresholds --------------------------------------------------------------------------------

THRESHOLD_CHECKS = ("min_perplexity", "min_usage", "max_dead_fraction")
"""The threshold checks, in the order they are reported (each is named after its key)."""
GATE_KEYS = (*THRESHOLD_CHECKS, "window", "fail_on")
"""Keys of `[tool.vqdoctor.gate]` (per-quantizer tables take the threshold checks only)."""
FAIL_ON = ("error", "warning", "never")
OFF = ("off", "none", "false", "disabled")


@dataclass(frozen=True)
class PerplexityFloor:
    """A perplexity floor: absolute (`20`) or relative to the reachable codes (`"5%"`).

    Attributes:
        value: the floor (absolute), or the share of reachable codes in (0, 1] (relative).
        relative: True for a share of the reachable codes.
        minimum: for a relative floor, never below this many codes (nor above half of what the
            measurement can reach): "a handful of codes" is a collapse whatever K is.
    """

    value: float
    relative: bool = False
    minimum: float | None = None

    def floor(self, reachable: float) -> float:
        """The absolute floor for a measurement that can reach `reachable` codes."""
        if not self.relative:
            return self.value
        f = self.value * reachable
        return max(f, min(self.minimum, reachable / 2)) if self.minimum else f

    def __str__(self) -> str:
        if self.relative:
            return f"{self.value * 100:g}%" + (f" (at least {self.minimum:g})" if self.minimum else "")
        return f"{self.value:g}"


# Collapse: perplexity <= 2 codes, or <= 1% of the reachable codes (index-collapse's error line).
COLLAPSE_FLOOR = PerplexityFloor(0.01, relative=True, minimum=2.0)


@dataclass(frozen=True)
class GateThresholds:
    """What the gate requires of each quantizer. `None` turns a check off.

    The defaults are scale-free and sit where the diagnosis rules draw their lines, so the gate and
    the report tell one story:

    - `min_perplexity` "1% (at least 2)": perplexity (the effective number of codes in use) above
      2 and at least 1% of the codes the measurement can reach: the line where index-collapse
      (VQ006) is an error, i.e. a collapse to a handful of codes (the user story: perplexity 1-2). The default gate fails on
      collapse, not on partial usage: converged models run at partial usage (VQGAN at K = 65,536
      uses 1.4-4.5% of its codes, SimVQ Table 1), and the findings check catches every broken run.
    - `min_usage`, `max_dead_fraction` off: opt-in floors on the share of codes used / dead
      (e.g. 0.25 and 0.5), for projects that know the utilisation they expect.
    - `window` None: a run's usage over the recorder's own window (long enough for ~4 expected
      hits per code); a number gates the last N steps instead. Ignored for checkpoints.
    - `fail_on` "error": findings of severity error fail the gate, as in `vqdoctor inspect`.

    Attributes:
        min_perplexity: perplexity floor, or None.
        min_usage: floor of the share of K used, in [0, 1], or None.
        max_dead_fraction: ceiling of the share of K dead, in [0, 1], or None.
        window: run directories: gate the last `window` steps (None: the recorded window).
        fail_on: "error", "warning" or "never": findings at or above it fail the gate.
        overrides: (fnmatch pattern, {check: value}) pairs for quantizers whose name matches;
            applied in order, later ones win (see `for_quantizer`).
    """

    min_perplexity: PerplexityFloor | None = COLLAPSE_FLOOR
    min_usage: float | None = None
    max_dead_fraction: float | None = None
    window: int | None = None
    fail_on: str = "error"
    overrides: tuple[tuple[str, Mapping[str, Any]], ...] = ()

    def for_quantizer(self, name: str) -> GateThresholds:
        """The thresholds of quantizer `name`: every override whose pattern matches, in order."""
        values: dict[str, Any] = {}
        for pattern, changes in self.overrides:
            if fnmatch.fnmatchcase(name, pattern):
                values.update(changes)
        return dataclasses.replace(self, overrides=(), **values)

    def to_dict(self) -> dict[str, Any]:
        """JSON-native: thresholds as written (`"5%"`), overrides by pattern."""
        out: dict[str, Any] = {k: _show(getattr(self, k)) for k in GATE_KEYS}
        if self.overrides:
            out["quantizers"] = {p: {k: _show(v) for k, v in ch.items()} for p, ch in self.overrides}
        return out


def _show(v: Any) -> Any:
    return str(v) if isinstance(v, PerplexityFloor) else v


def parse_threshold(key: str, value: Any, where: str = "") -> Any:
    """Check and convert one gate setting (a TOML value or an option string).

    `min_perplexity` takes "5%" (relative) or a number >= 1 (absolute); `min_usage` and
    `max_dead_fraction` a fraction in [0, 1] or a percentage; `window` a positive integer;
    `fail_on` error|warning|never. "off" (or `false`) turns a threshold check off.

    Args:
        key: a name from `GATE_KEYS`.
        value: the value as written.
        where: where it was written, for the error message (e.g. "--min-usage").

    Raises:
        ConfigError: unknown key or a bad value.
    """
    label = where or key
    if key not in GATE_KEYS:
        raise ConfigError(f"unknown gate setting {key!r}{' in ' + where if where else ''}; "
                          f"known: {', '.join(GATE_KEYS)}")
    text = value.strip() if isinstance(value, str) else value
    if key in THRESHOLD_CHECKS and (text is False or (isinstance(text, str) and text.lower() in OFF)):
        return None
    if key == "fail_on":
        if not isinstance(text, str) or text.lower() not in FAIL_ON:
            raise ConfigError(f"{label}: expected one of {', '.join(FAIL_ON)}, got {value!r}")
        return text.lower()
    if key == "window":
        if isinstance(text, str) and text.lower() in OFF + ("auto",):
            return None
        try:
            if isinstance(text, bool) or isinstance(text, float):
                raise ValueError
            n = int(text)
        except (TypeError, ValueError):
            n = 0
        if n < 1:
            raise ConfigError(f"{label}: expected a number of steps >= 1, got {value!r}")
        return n
    pct = isinstance(text, str) and text.endswith("%")
    try:
        if isinstance(text, bool):
            raise ValueError
        x = float(text[:-1] if pct else text)
    except (TypeError, ValueError):
        x = math.nan
    if not math.isfinite(x):
        hint = '"5%" of the reachable codes or an absolute number >= 1' \
            if key == "min_perplexity" else 'a fraction in [0, 1], e.g. 0.25, or "25%"'
        raise ConfigError(f"{label}: expected {hint}, got {value!r}")
    if key == "min_perplexity":
        if pct:
            if not 0 < x <= 100:
                raise ConfigError(f"{label}: a relative perplexity floor must be in (0%, 100%], "
                                  f"got {value!r}")
            return PerplexityFloor(x / 100, relative=True)
        if x < 1:
            raise ConfigError(f"{label}: a perplexity is never below 1, so {value!r} never fails; "
                              f"for a share of the codes write a percentage, e.g. \"{x * 100:g}%\"")
        return PerplexityFloor(x)
    frac = x / 100 if pct else x
    if not 0 <= frac <= 1:
        raise ConfigError(f"{label}: expected a fraction in [0, 1] (or 0%..100%), got {value!r}")
    return frac


def resolve_gate_thresholds(cli: Mapping[str, Any] | None = None,
                            config: Mapping[str, Any] | None = None) -> GateThresholds:
    """Gate thresholds from the command line and `[tool.vqdoctor.gate]`: CLI > file > defaults.

    Per-quantizer tables (`[tool.vqdoctor.gate.quantizers."pattern"]`) refine the file's values
    for matching quantizers; a value given on the command line wins over them too.

    Args:
        cli: settings given on the command line (None values are "not given").
        config: the `[tool.vqdoctor.gate]` table (e.g. `load_config().gate`).

    Raises:
        ConfigError: unknown keys or bad values, naming where they were written.
    """
    cli = {k: v for k, v in (cli or {}).items() if v is not None}
    config = dict(config or {})
    values: dict[str, Any] = {}
    tables = config.pop("quantizers", {}) or {}
    for key, value in config.items():
        values[key] = parse_threshold(key, value, f"[tool.vqdoctor.gate] {key}")
    overrides = []
    for pattern, table in tables.items():
        where = f'[tool.vqdoctor.gate.quantizers."{pattern}"]'
        if not isinstance(table, Mapping):
            raise ConfigError(f"{where} must be a table of thresholds")
        changes = {}
        for key, value in table.items():
            if key not in THRESHOLD_CHECKS:
                raise ConfigError(f"unknown setting {key!r} in {where}; known: "
                                  f"{', '.join(THRESHOLD_CHECKS)}")
            if key not in cli:  # the command line wins over the file, per-quantizer tables too
                changes[key] = parse_threshold(key, value, f"{where} {key}")
        overrides.append((str(pattern), changes))
    for key, value in cli.items():
        values[key] = parse_threshold(key, value, "--" + key.replace("_", "-"))
    return GateThresholds(**values, overrides=tuple(overrides))
