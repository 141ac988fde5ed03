"""Inline SVG charts for the HTML formats: line charts (linear or log axes, marked steps), a
histogram and a heat-map grid. Pure string building: no scripts, no external resources.

Every chart is one `<svg class="chart" data-chart="ID">` element with a `<title>` (so a browser
shows it as a labelled image and a test can find it by id); hover titles on points and cells
give the exact values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from html import escape
from typing import Any

from vqdoctor.numbers import fmt_num, fmt_pct

PALETTE = ("#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed", "#0891b2", "#db2777", "#65a30d")
MARK_COLOR = {"error": "#dc2626", "warning": "#d97706", "info": "#6b7280"}
W, H = 600, 230
PAD_L, PAD_R, PAD_T, PAD_B = 58, 14, 40, 34


def _attr(v: Any) -> str:
    return escape(str(v), quote=True)


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About n round tick values covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo]
    raw = (hi - lo) / max(1, n)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.ceil(lo / step) * step
    out, t = [], start
    while t <= hi + step * 1e-9:
        out.append(round(t, 12))
        t += step
    return out or [lo]


def _log_ticks(lo: float, hi: float) -> list[float]:
    """Powers of ten inside [lo, hi]; with 1-2-5 steps when the range spans under 3 decades."""
    a, b = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    mults = (1, 2, 5) if b - a <= 3 else (1,)
    step = max(1, (b - a) // 6)
    out = [m * 10.0 ** e for e in range(a, b + 1, step) for m in mults if lo <= m * 10.0 ** e <= hi]
    if len(out) < 3:  # under a decade: round linear values, placed on the log scale
        out = [t for t in _ticks(lo, hi, 4) if t > 0]
    return out or [lo, hi]


class _Axes:
    """Maps data to pixels for one chart (linear or log on each axis)."""

    def __init__(self, xs: Sequence[float], ys: Sequence[float], *, log_x: bool, log_y: bool,
                 y_range: tuple[float, float] | None, width: int, height: int):
        self.log_x, self.log_y = log_x, log_y
        self.width, self.height = width, height
        fx = [x for x in xs if math.isfinite(x) and (x > 0 or not log_x)]
        fy = [y for y in ys if math.isfinite(y) and (y > 0 or not log_y)]
        self.x0, self.x1 = (min(fx), max(fx)) if fx else (0.0, 1.0)
        if y_range is not None:
            self.y0, self.y1 = y_range
        else:
            self.y0, self.y1 = (min(fy), max(fy)) if fy else (0.0, 1.0)
            if not log_y:
                self.y0 = min(self.y0, 0.0) if self.y0 >= 0 and self.y0 < 0.25 * self.y1 else self.y0
        if self.x1 <= self.x0:
            self.x1 = self.x0 + (1.0 if not log_x else self.x0 * 9 or 1.0)
        if self.y1 <= self.y0:
            pad = abs(self.y0) * 0.1 or 1.0
            self.y0, self.y1 = (self.y0 / 10, self.y1 * 10) if log_y else (self.y0 - pad, self.y1 + pad)
        if log_y and self.y0 <= 0:
            self.y0 = self.y1 / 1e6

    def _t(self, v: float, lo: float, hi: float, log: bool) -> float:
        if log:
            v, lo, hi = math.log10(max(v, lo)), math.log10(lo), math.log10(hi)
        return (v - lo) / (hi - lo)

    def px(self, x: float) -> float:
        return PAD_L + self._t(x, self.x0, self.x1, self.log_x) * (self.width - PAD_L - PAD_R)

    def py(self, y: float) -> float:
        t = min(1.0, max(0.0, self._t(y, self.y0, self.y1, self.log_y)))
        return self.height - PAD_B - t * (self.height - PAD_T - PAD_B)

    def xticks(self) -> list[float]:
        return _log_ticks(self.x0, self.x1) if self.log_x else _ticks(self.x0, self.x1)

    def yticks(self) -> list[float]:
        return _log_ticks(self.y0, self.y1) if self.log_y else _ticks(self.y0, self.y1, 4)


def _frame(chart_id: str, title: str, width: int, height: int, body: list[str]) -> str:
    head = (f'<svg class="chart" data-chart="{_attr(chart_id)}" xmlns="http://www.w3.org/2000/svg" '
            f'viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
            f'aria-label="{_attr(title)}">')
    return "".join([head, f"<title>{escape(title)}</title>",
                    f'<text class="ct" x="{PAD_L - 50}" y="17">{escape(title)}</text>', *body, "</svg>"])


def _grid(ax: _Axes, y_fmt: Any, x_label: str, y_label: str) -> list[str]:
    out = []
    for t in ax.yticks():
        y = ax.py(t)
        out.append(f'<line class="grid" x1="{PAD_L}" y1="{y:.1f}" x2="{ax.width - PAD_R}" y2="{y:.1f}"/>')
        out.append(f'<text class="tick" x="{PAD_L - 6}" y="{y + 4:.1f}" text-anchor="end">{escape(y_fmt(t))}</text>')
    for t in ax.xticks():
        x = ax.px(t)
        out.append(f'<text class="tick" x="{x:.1f}" y="{ax.height - PAD_B + 15}" text-anchor="middle">'
                   f'{escape(fmt_num(t))}</text>')
    out.append(f'<line class="axis" x1="{PAD_L}" y1="{ax.height - PAD_B}" x2="{ax.width - PAD_R}" '
               f'y2="{ax.height - PAD_B}"/>')
    out.append(f'<line class="axis" x1="{PAD_L}" y1="{PAD_T}" x2="{PAD_L}" y2="{ax.height - PAD_B}"/>')
    if x_label:
        out.append(f'<text class="lab" x="{ax.width - PAD_R}" y="{ax.height - 4}" text-anchor="end">'
                   f'{escape(x_label)}</text>')
    if y_label:
        out.append(f'<text class="lab" x="{PAD_L - 6}" y="{PAD_T - 8}" text-anchor="end">{escape(y_label)}</text>')
    return out


def line_chart(chart_id: str, title: str, lines: Sequence[tuple[str, Sequence[float], Sequence[float | None]]],
               *, marks: Sequence[tuple[float, str, str]] = (), log_x: bool = False, log_y: bool = False,
               pct: bool = False, y_range: tuple[float, float] | None = None, x_label: str = "step",
               y_label: str = "", width: int = W, height: int = H) -> str:
    """A line chart of several series, with vertical marks (e.g. the steps alerts first held).

    Args:
        chart_id: the `data-chart` id.
        title: shown above the chart and as its accessible name.
        lines: (label, xs, ys) per series; a None y breaks the line.
        marks: (x, label, severity) vertical marks.
        log_x / log_y: logarithmic axes (non-positive values are dropped there).
        pct: y values are fractions, labelled as percentages.
        y_range: fixed y range (default: the data's).
    """
    xs = [float(x) for _, lx, _ in lines for x in lx]
    ys = [float(y) for _, _, ly in lines for y in ly if y is not None]
    ax = _Axes(xs + [float(m[0]) for m in marks], ys, log_x=log_x, log_y=log_y, y_range=y_range,
               width=width, height=height)
    y_fmt = fmt_pct if pct else fmt_num
    body = _grid(ax, y_fmt, x_label, y_label)
    for i, (x, label, sev) in enumerate(marks):
        if log_x and x <= 0:
            continue
        px = ax.px(float(x))
        color = MARK_COLOR.get(sev, MARK_COLOR["info"])
        body.append(f'<g class="mark"><title>{escape(label)} first held at step {fmt_num(x)}</title>'
                    f'<line x1="{px:.1f}" y1="{PAD_T}" x2="{px:.1f}" y2="{height - PAD_B}" '
                    f'stroke="{color}" stroke-dasharray="4 3"/>'
                    f'<text class="mk" x="{px + 3:.1f}" y="{PAD_T + 9 + 11 * (i % 4)}" fill="{color}">'
                    f'{escape(label)}</text></g>')
    for i, (label, lx, ly) in enumerate(lines):
        color = PALETTE[i % len(PALETTE)]
        segs: list[list[str]] = [[]]
        dots = []
        for x, y in zip(lx, ly, strict=False):
            if y is None:  # not measured at this step (cadence metrics): the line goes on
                continue
            ok = math.isfinite(float(y)) and (float(y) > 0 or not log_y) and (float(x) > 0 or not log_x)
            if not ok:  # non-finite (or not drawable on a log axis): a gap
                if segs[-1]:
                    segs.append([])
                continue
            p = f"{ax.px(float(x)):.1f},{ax.py(float(y)):.1f}"
            segs[-1].append(p)
            dots.append((p, x, y))
        for seg in segs:
            if len(seg) > 1:
                body.append(f'<polyline class="ln" points="{" ".join(seg)}" stroke="{color}"/>')
            elif len(seg) == 1:
                cx, cy = seg[0].split(",")
                body.append(f'<circle cx="{cx}" cy="{cy}" r="2.5" fill="{color}"/>')
        if len(dots) <= 60:
            for p, x, y in dots:
                cx, cy = p.split(",")
                body.append(f'<circle class="pt" cx="{cx}" cy="{cy}" r="2" fill="{color}">'
                            f'<title>{escape(label)} @{fmt_num(x)}: {escape(y_fmt(y))}</title></circle>')
    if len(lines) > 1 or (lines and lines[0][0]):
        for i, (label, _, _) in enumerate(lines[:8]):
            color = PALETTE[i % len(PALETTE)]
            y = PAD_T + 8 + 13 * i
            body.append(f'<g class="legend"><rect x="{width - PAD_R - 150}" y="{y - 21}" width="10" '
                        f'height="3" fill="{color}"/><text class="lg" x="{width - PAD_R - 136}" y="{y - 16}">'
                        f'{escape(_short(label, 22))}</text></g>')
    return _frame(chart_id, title, width, height, body)


def histogram(chart_id: str, title: str, edges: Sequence[float], counts: Sequence[float], *,
              x_label: str = "", width: int = W // 2, height: int = H, color: str = PALETTE[0]) -> str:
    """Bars of `counts` between consecutive `edges`."""
    n = len(counts)
    ax = _Axes([edges[0], edges[-1]] if n else [0, 1], [0.0, float(max(counts, default=1) or 1)],
               log_x=False, log_y=False, y_range=(0.0, float(max(counts, default=1) or 1)),
               width=width, height=height)
    body = _grid(ax, lambda v: fmt_num(int(v)) if float(v).is_integer() else fmt_num(v), x_label, "codes")
    for i in range(n):
        x0, x1 = ax.px(float(edges[i])), ax.px(float(edges[i + 1]))
        y = ax.py(float(counts[i]))
        body.append(f'<rect class="bar" x="{x0:.1f}" y="{y:.1f}" width="{max(0.8, x1 - x0 - 0.6):.1f}" '
                    f'height="{height - PAD_B - y:.1f}" fill="{color}"><title>{fmt_num(edges[i])}-'
                    f'{fmt_num(edges[i + 1])}: {fmt_num(counts[i])} codes</title></rect>')
    return _frame(chart_id, title, width, height, body)


def heat_grid(chart_id: str, title: str, row_labels: Sequence[str], col_values: Sequence[float],
              cells: Sequence[Sequence[float | None]], *, value_label: str = "", pct: bool = True,
              width: int = W, height: int | None = None) -> str:
    """A grid of cells (rows x columns) shaded by value in [0, 1]: e.g. residual stages x steps.

    Args:
        row_labels: one label per row (stage, head).
        col_values: the x value (step) of each column.
        cells: cells[row][col], None where not measured.
    """
    rows = len(row_labels)
    cols = max(1, len(col_values))
    cell_h = 16 if rows <= 16 else max(6, 256 // rows)
    height = height or PAD_T + rows * cell_h + PAD_B
    gx0, gx1 = PAD_L + 30, width - PAD_R
    cw = (gx1 - gx0) / cols
    body = []
    for r, label in enumerate(row_labels):
        y = PAD_T + r * cell_h
        if cell_h >= 10:
            body.append(f'<text class="tick" x="{gx0 - 4}" y="{y + cell_h - 4}" text-anchor="end">'
                        f'{escape(_short(label, 14))}</text>')
        for c in range(cols):
            v = cells[r][c] if r < len(cells) and c < len(cells[r]) else None
            fill = "#e5e7eb" if v is None else _shade(float(v))
            tip = "not measured" if v is None else (fmt_pct(v) if pct else fmt_num(v))
            at = f"@{fmt_num(col_values[c])}" if c < len(col_values) else ""
            body.append(f'<rect x="{gx0 + c * cw:.1f}" y="{y}" width="{max(0.5, cw - 0.3):.2f}" '
                        f'height="{cell_h - 1}" fill="{fill}"><title>{escape(label)} {at}: '
                        f'{escape(tip)}</title></rect>')
    if col_values:
        for t in _ticks(float(col_values[0]), float(col_values[-1]), 5) if len(col_values) > 1 else [col_values[0]]:
            idx = min(range(len(col_values)), key=lambda i: abs(float(col_values[i]) - t))
            x = gx0 + (idx + 0.5) * cw
            body.append(f'<text class="tick" x="{x:.1f}" y="{PAD_T + rows * cell_h + 14}" '
                        f'text-anchor="middle">{escape(fmt_num(t))}</text>')
    body.append(f'<text class="lab" x="{gx1}" y="{height - 4}" text-anchor="end">'
                f'{escape(value_label)} (dark = high)</text>')
    return _frame(chart_id, title, width, height, body)


def _shade(v: float) -> str:
    """White (0) to deep blue (1)."""
    t = min(1.0, max(0.0, v))
    r, g, b = (int(247 + (29 - 247) * t), int(251 + (78 - 251) * t), int(255 + (216 - 255) * t))
    return f"#{r:02x}{g:02x}{b:02x}"


def _short(text: str, n: int) -> str:
    text = str(text)
    return text if len(text) <= n else "…" + text[-(n - 1):]


__all__ = ["heat_grid", "histogram", "line_chart"]
