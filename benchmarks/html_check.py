"""Open vqdoctor's HTML reports in a real headless Chromium: no console errors, every chart drawn.

    python benchmarks/html_check.py report.html [more.html ...] [--screenshot out.png]

For each file: loads it with Chromium (Debian's `chromium`; `apt-get install -y chromium`) in a
fresh profile with networking features off, captures the browser's console (`--enable-logging
=stderr --v=0`: script errors and Content-Security-Policy refusals are console messages), dumps
the DOM after load and checks that every chart `<svg data-chart=...>` the file holds is in it
with drawn content. Exit 0 when every file passes, 1 otherwise, 2 without Chromium.
`tests/test_formats_html.py` runs the same check when Chromium is installed.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-extensions", "--hide-scrollbars"]
CHART = re.compile(r'<svg class="chart" data-chart="([^"]+)"')
CONSOLE = re.compile(r":CONSOLE[(:]\d+\)?\]|Refused to |Uncaught ")


def chromium() -> str | None:
    """The Chromium binary on PATH, or None."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _run(args: list[str], timeout: float = 90.0) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="vqdoctor-chromium-") as profile:
        return subprocess.run([chromium() or "chromium", *FLAGS, f"--user-data-dir={profile}", *args],
                              capture_output=True, text=True, timeout=timeout)


def check(path: str | Path) -> dict:
    """Load `path`; returns {"charts": ids in the file, "rendered": ids in the DOM with content,
    "console": console/CSP lines, "ok": bool}."""
    path = Path(path).resolve()
    text = path.read_text(encoding="utf-8")
    charts = CHART.findall(text)
    done = _run(["--enable-logging=stderr", "--v=0", "--dump-dom", path.as_uri()])
    dom = done.stdout
    rendered = []
    for m in re.finditer(r'<svg class="chart" data-chart="([^"]+)"(.*?)</svg>', dom, flags=re.S):
        if re.search(r"<(polyline|rect|circle)\b", m.group(2)):
            rendered.append(m.group(1))
    console = [line for line in done.stderr.splitlines() if CONSOLE.search(line)]
    ok = done.returncode == 0 and bool(dom.strip()) and rendered == charts and not console
    return {"charts": charts, "rendered": rendered, "console": console, "ok": ok,
            "returncode": done.returncode}


def screenshot(path: str | Path, png: str | Path, *, width: int = 1360, height: int = 2000) -> Path:
    """A PNG of the page at `width` x `height` pixels."""
    png = Path(png).resolve()
    _run([f"--window-size={width},{height}", f"--screenshot={png}", Path(path).resolve().as_uri()])
    return png


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--screenshot", type=Path, help="PNG of the first file")
    ap.add_argument("--height", type=int, default=2000)
    args = ap.parse_args(argv)
    if chromium() is None:
        print("html_check: chromium not found (apt-get install -y chromium)", file=sys.stderr)
        return 2
    failed = 0
    for f in args.files:
        r = check(f)
        status = "ok" if r["ok"] else "FAIL"
        print(f"{status} {f}: {len(r['rendered'])}/{len(r['charts'])} charts drawn, "
              f"{len(r['console'])} console messages")
        for line in r["console"]:
            print(f"    {line}")
        failed += not r["ok"]
    if args.screenshot is not None:
        print(f"screenshot: {screenshot(args.files[0], args.screenshot, height=args.height)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
