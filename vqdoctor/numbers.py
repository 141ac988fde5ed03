"""The one set of number formatters: reports, gate results, the live panel and the exporters.

Two styles, each in one place:

- `fmt_num` / `fmt_pct` / `fmt_value`: numbers for people in reports (3 significant digits,
  magnitudes as `1.2e+13`, a small non-zero share never rounded to 0%);
- `fmt_compact`: the live panel's terse style (`-` when absent, `57%`, `2.00e-04`);
- `fmt_exact` / `fmt_share`: a gate check's value against its threshold (`63 >= 3.2`, `25%`).

Nothing here imports torch or reads anything; the functions take plain Python numbers.
"""

from __future__ import annotations

import math
from typing import Any


def is_number(v: Any) -> bool:
    """True for int/float values (bool excluded)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def as_float(v: Any) -> float | None:
    """`v` as a float when it is a number (bool excluded), else None."""
    return float(v) if is_number(v) else None


def finite(v: Any) -> float | None:
    """`v` as a float when it is a finite number, else None."""
    x = as_float(v)
    return x if x is not None and math.isfinite(x) else None


def fmt_num(v: Any) -> str:
    """A number for people: 3 significant digits, exponents for floats outside [1e-3, 1e4).

    `None` and NaN read "n/a"; integers stay integers; booleans read "yes"/"no".
    """
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if not is_number(v):
        return str(v)
    x = float(v)
    if math.isnan(x):
        return "n/a"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    ax = abs(x)
    if isinstance(v, int):
        return str(v) if ax < 1e9 else f"{x:.3g}"
    if x.is_integer() and ax < 1e4:
        return str(int(x))
    if ax >= 1e4 or ax < 1e-3:  # a float this large or small is a magnitude: 2 digits
        return f"{x:.2g}"
    if ax >= 100:
        return f"{x:.0f}"
    return f"{x:.3g}"


def fmt_pct(v: Any) -> str:
    """A fraction in [0, 1] as a percentage that never rounds a small non-zero share to 0%."""
    if not is_number(v) or math.isnan(float(v)):
        return "n/a"
    p = float(v) * 100
    if p == 0:
        return "0%"
    if 0 < p < 0.1:
        return "<0.1%"
    if 99.9 < p < 100:
        return ">99.9%"
    if p == 100:
        return "100%"
    if p < 10:
        return f"{p:.1f}".rstrip("0").rstrip(".") + "%"
    whole = f"{p:.0f}"
    return (f"{p:.1f}" if whole == "100" else whole) + "%"


def fmt_value(v: Any, *, max_items: int = 4) -> str:
    """An evidence value: numbers via `fmt_num`, short lists, nested dicts as k=v."""
    if isinstance(v, dict):
        inner = ", ".join(f"{k}={fmt_value(x, max_items=max_items)}" for k, x in v.items())
        return "{" + inner + "}"
    if isinstance(v, (list, tuple)):
        items = [fmt_value(x, max_items=max_items) for x in v[:max_items]]
        if len(v) > max_items:
            items.append(f"... ({len(v)} items)")
        return "[" + ", ".join(items) + "]"
    return fmt_num(v)


def fmt_evidence(evidence: dict[str, Any]) -> str:
    """`k=v, k=v` for a finding's evidence."""
    return ", ".join(f"{k}={fmt_value(v)}" for k, v in evidence.items())


def fmt_compact(v: float | None, pct: bool = False) -> str:
    """The live panel's style: "-" when absent, "57%" for shares, "2.00e-04" for magnitudes."""
    if v is None:
        return "-"
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    if pct:
        return f"{100 * v:.0f}%"
    a = abs(v)
    if a != 0 and (a >= 1e4 or a < 1e-3):
        return f"{v:.2e}"
    return f"{v:.3g}" if a < 100 else f"{v:.0f}"


def fmt_exact(x: float) -> str:
    """A measured value against a threshold (gate checks): integers exact, else 3 significant digits."""
    if not math.isfinite(x):
        return str(x)
    if x == int(x) and abs(x) < 1e6:
        return str(int(x))
    return f"{x:.3g}"


def fmt_share(x: float) -> str:
    """A share compared with a threshold (gate checks): exact whole percents, else 3 digits."""
    if not math.isfinite(x):
        return str(x)
    p = x * 100
    if p == int(p):
        return f"{int(p)}%"
    return f"{p:.3g}%" if p >= 0.1 else f"{p:.2g}%"


def one_line(text: str) -> str:
    """Collapse all whitespace (newlines included) to single spaces."""
    return " ".join(str(text).split())


__all__ = ["as_float", "finite", "fmt_compact", "fmt_evidence", "fmt_num", "fmt_pct", "fmt_value",
           "fmt_exact", "fmt_share", "is_number", "one_line"]
