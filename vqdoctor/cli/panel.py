"""The live panel: what a watched run looks like while it is being recorded.

The panel shows a `vqdoctor.live.follow.WatchPanel`, which reads the run directory only (the
store's one reader), so it works the same over a training in this
process (the demo), a child process (`vqdoctor watch -- CMD`) and a run recorded elsewhere
(`vqdoctor watch RUN_DIR`). Every few seconds it runs the rules over the records so far
(`vqdoctor.diagnosis.report_records`) and raises an **alert** for each finding of severity
error or warning, with the step at which it first held; an alert keeps the earliest step it was
ever seen at.

Three displays (`open_display`):

- `LiveDisplay`: a rich `Live` panel, for a terminal where nothing else writes (the demo,
  `vqdoctor watch RUN_DIR`);
- `PinnedDisplay`: the same panel pinned to the bottom rows of a terminal (a scroll region),
  for `vqdoctor watch -- CMD`: the command writes straight to the terminal above the panel,
  which a `Live` display (cursor-up redraws) would garble;
- `LineDisplay`: plain lines on stderr when it is not a terminal (CI logs), one status line at
  most every `every` seconds and one line per new alert, e.g.::

      vqdoctor: step 450  quantizer: ppl 12.3/512 usage 41% dead 55% scale 1.02  loss 0.213
      vqdoctor: ALERT VQ005 dead-codes (quantizer) @step 120: 55% of codes dead ...
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Callable
from typing import Any

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from vqdoctor.live.alerts import Alert
from vqdoctor.live.follow import WatchPanel
from vqdoctor.numbers import fmt_compact

# quantizers shown (the rest are counted)
MAX_QUANTIZERS = 8
# alerts shown in the terminal panels (most recent first-held steps last)
MAX_ALERTS = 6


def renderable(panel: WatchPanel, title: str | None = None) -> Group:
    """The panel as a rich renderable: a header, one row per quantizer, then the alerts."""
    head = Text()
    head.append("vqdoctor watch", style="bold")
    if title:
        head.append(f"  {title}", style="dim")
    head.append(f"  step {panel.step if panel.step is not None else '-'}")
    if panel.loss is not None:
        head.append(f"  loss {fmt_compact(panel.loss)}")
    if panel.world_size > 1:
        head.append(f"  ranks {panel.world_size} (values of rank {min(panel.tail.streams or [0])})",
                    style="dim")
    status = panel.status
    head.append(f"  [{status}]", style={"failed": "red", "finished": "green"}.get(status, "dim"))
    parts: list[Any] = [head]
    if panel.latest:
        table = Table(box=None, pad_edge=False, show_edge=False, header_style="bold")
        for col, justify in (("quantizer", "left"), ("ppl / K", "right"), ("usage", "right"),
                             ("dead", "right"), ("scale", "right")):
            table.add_column(col, justify=justify)  # type: ignore[arg-type]
        names = list(panel.latest)
        for name in names[:MAX_QUANTIZERS]:
            m = panel.latest[name]
            k = panel._codebook_size(name)
            table.add_row(name, fmt_compact(m.get("perplexity")) + (f" / {k}" if k else ""),
                          fmt_compact(m.get("usage_window"), pct=True),
                          fmt_compact(m.get("dead_fraction"), pct=True), fmt_compact(m.get("scale_ratio")))
        if len(names) > MAX_QUANTIZERS:
            table.add_row(f"(+{len(names) - MAX_QUANTIZERS} more)", "", "", "", "")
        parts.append(table)
    else:
        parts.append(Text("waiting for the first records ...", style="dim"))
    alerts = panel.sorted_alerts()
    if alerts:
        for a in alerts[:MAX_ALERTS]:
            parts.append(Text(a.line(), style="bold red" if a.severity == "error" else "yellow",
                              no_wrap=True, overflow="ellipsis"))
        if len(alerts) > MAX_ALERTS:
            parts.append(Text(f"(+{len(alerts) - MAX_ALERTS} more alerts)", style="dim"))
    elif panel.recorded:
        parts.append(Text("no alerts", style="green"))
    return Group(*parts)


# ---------------------------------------------------------------------------------- displays


class Display:
    """Shows a `WatchPanel`; `update()` is called every half second or so, `close()` once."""

    def __init__(self, panel: WatchPanel, console: Console, title: str | None = None):
        self.panel = panel
        self.console = console
        self.title = title

    def update(self, *, final: bool = False) -> list[Alert]:
        """Refresh the panel (rules when due; always when `final`) and show it."""
        return self.panel.refresh(rules=True if final else None)

    def close(self) -> None:
        """Stop showing the panel (leaves the terminal as it was)."""

    def __enter__(self) -> Display:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class NullDisplay(Display):
    """No panel (`--no-panel` on a terminal): the state is still kept, for alerts."""


class LineDisplay(Display):
    """Plain lines on a non-terminal stream: a status line at most every `every` seconds, when
    there is news, and one line per alert as soon as it fires."""

    def __init__(self, panel: WatchPanel, console: Console, title: str | None = None, *,
                 every: float = 5.0):
        super().__init__(panel, console, title)
        self.every = float(every)
        self._last = 0.0
        self._last_step: int | None = None

    def _say(self, text: str) -> None:
        self.console.print(Text(f"vqdoctor: {text}"), soft_wrap=True)

    def update(self, *, final: bool = False) -> list[Alert]:
        alerts = super().update(final=final)
        now = time.monotonic()
        news = self.panel.step is not None and self.panel.step != self._last_step
        if news and (final or now - self._last >= self.every or alerts):
            self._say(self.panel.status_line())
            self._last, self._last_step = now, self.panel.step
        for a in alerts:
            self._say(a.line())
        return alerts


class LiveDisplay(Display):
    """A rich `Live` panel on a terminal where nothing else writes meanwhile."""

    def __init__(self, panel: WatchPanel, console: Console, title: str | None = None):
        super().__init__(panel, console, title)
        from rich.live import Live

        self._live = Live(renderable(panel, title), console=console, auto_refresh=False,
                          transient=False, redirect_stdout=False, redirect_stderr=False)
        self._live.start()

    def update(self, *, final: bool = False) -> list[Alert]:
        alerts = super().update(final=final)
        self._live.update(renderable(self.panel, self.title), refresh=True)
        return alerts

    def close(self) -> None:
        self._live.stop()


class PinnedDisplay(Display):
    """The panel pinned to the bottom rows of a terminal; everything else scrolls above it.

    Uses a scroll region (DECSTBM, `ESC [ top ; bottom r`), as apt's progress bar does: a child
    process writing straight to the terminal scrolls inside the region, and each redraw is one
    `write` that saves the cursor, draws the bottom rows and restores it. Closing clears the
    rows and resets the region.
    """

    def __init__(self, panel: WatchPanel, console: Console, title: str | None = None, *,
                 max_rows: int = 12):
        super().__init__(panel, console, title)
        self.max_rows = max_rows
        self._rows = 0
        self._height = 0
        self._fd = _fileno(console.file)
        self.update()

    def _size(self) -> tuple[int, int]:
        try:
            sz = os.get_terminal_size(self._fd if self._fd is not None else 2)
            return sz.columns, sz.lines
        except OSError:
            return 80, 24

    def _lines(self, width: int) -> list[str]:
        buf = io.StringIO()
        con = Console(file=buf, force_terminal=True, width=width,
                      color_system=self.console.color_system or None, no_color=self.console.no_color,
                      highlight=False, emoji=False, markup=False)
        con.print(renderable(self.panel, self.title), soft_wrap=False, crop=True, overflow="ellipsis")
        return buf.getvalue().rstrip("\n").split("\n")

    def _write(self, text: str) -> None:
        try:
            if self._fd is not None:
                data = text.encode("utf-8", errors="replace")
                while data:
                    n = os.write(self._fd, data)
                    data = data[n:]
            else:
                self.console.file.write(text)
                self.console.file.flush()
        except OSError:
            pass

    def update(self, *, final: bool = False) -> list[Alert]:
        alerts = super().update(final=final)
        width, height = self._size()
        lines = self._lines(width)[: max(1, min(self.max_rows, height // 2))]
        out = []
        if len(lines) != self._rows or height != self._height:
            out.append(self._clear_seq())
            n = len(lines)
            # make room at the bottom, then confine scrolling to the rows above the panel
            out.append("\n" * n + f"\x1b[{n}A" + "\x1b7" + f"\x1b[1;{height - n}r" + "\x1b8")
            self._rows, self._height = n, height
        out.append("\x1b7")
        for i, line in enumerate(lines):
            out.append(f"\x1b[{height - len(lines) + 1 + i};1H\x1b[2K{line}")
        out.append("\x1b8")
        self._write("".join(out))
        return alerts

    def _clear_seq(self) -> str:
        if not self._rows:
            return ""
        seq = ["\x1b7"]
        for i in range(self._rows):
            seq.append(f"\x1b[{self._height - self._rows + 1 + i};1H\x1b[2K")
        seq.append("\x1b[r\x1b8")
        return "".join(seq)

    def close(self) -> None:
        self._write(self._clear_seq())
        self._rows = 0


def _fileno(f: Any) -> int | None:
    try:
        return int(f.fileno())
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return None


def open_display(panel: WatchPanel, *, mode: str = "auto", console: Console | None = None,
                 title: str | None = None, child_output: bool = False, every: float = 5.0) -> Display:
    """The display for this stream.

    Args:
        panel: the panel state.
        mode: "auto" (a terminal panel on a terminal, lines otherwise), "live", "pinned",
            "lines" or "off".
        console: where to show it (default: a console on stderr).
        title: shown in the panel's header (e.g. the command).
        child_output: another process writes to the same terminal (the launcher's child):
            "auto" then pins the panel to the bottom rows instead of using rich `Live`.
        every: seconds between two plain status lines.
    """
    con = console or Console(stderr=True, highlight=False, emoji=False, markup=False, soft_wrap=True)
    if mode == "auto":
        if not con.is_terminal or con.is_dumb_terminal:
            mode = "lines"
        elif child_output:
            mode = "pinned" if os.name == "posix" else "lines"
        else:
            mode = "live"
    if mode == "off":
        return NullDisplay(panel, con, title)
    if mode == "lines":
        return LineDisplay(panel, con, title, every=every)
    if mode == "pinned":
        return PinnedDisplay(panel, con, title)
    if mode == "live":
        return LiveDisplay(panel, con, title)
    raise ValueError(f"unknown panel mode {mode!r}")


def display_for(mode: str = "auto", console: Console | None = None, every: float = 5.0
                ) -> Callable[[WatchPanel, str], Display]:
    """A `display` for `live.launcher.run_watched`: the panel over a child's output."""
    def make(panel: WatchPanel, title: str) -> Display:
        return open_display(panel, mode=mode, console=console, title=title, child_output=True, every=every)
    return make


def follow_run(run_dir: str | os.PathLike[str], *, mode: str = "auto", console: Console | None = None,
               poll: float = 0.5, every: float = 5.0, stop: Callable[[], bool] | None = None,
               thresholds: dict[str, dict[str, Any]] | None = None, title: str | None = None,
               wait_for_start: float | None = None, rules_every: float = 3.0) -> WatchPanel:
    """Show the panel over a run until its meta.json says finished/failed (or `stop()` is True).

    Args:
        run_dir: the run directory (it may not hold records yet).
        mode: display mode, see `open_display`.
        console: where to show it.
        poll: seconds between two reads of the run directory.
        every: seconds between two plain status lines.
        stop: called at every poll; True ends the panel early.
        thresholds: rule threshold overrides.
        title: shown in the header.
        wait_for_start: give up after this many seconds when nothing was ever recorded.
        rules_every: seconds between two runs of the rules (alerts).

    Returns:
        The panel state at the end (alerts, latest values).
    """
    panel = WatchPanel(run_dir, thresholds=thresholds, rules_every=rules_every)
    t0 = time.monotonic()
    with open_display(panel, mode=mode, console=console, title=title, every=every) as display:
        while True:
            display.update()
            if panel.status in ("finished", "failed") and panel.recorded:
                break
            if stop is not None and stop():
                break
            if (wait_for_start is not None and not panel.recorded
                    and time.monotonic() - t0 > wait_for_start):
                break
            time.sleep(poll)
        display.update(final=True)
    return panel


__all__ = ["Display", "LineDisplay", "LiveDisplay", "NullDisplay", "PinnedDisplay", "WatchPanel",
           "display_for", "follow_run", "open_display", "renderable"]
