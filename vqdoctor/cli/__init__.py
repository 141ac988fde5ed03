"""Command-line interface (Typer): `vqdoctor demo | inspect | watch | report | gate | rules`.

A thin layer over the library: commands parse options, call the library, render the report with
`vqdoctor.formats`, and map outcomes to exit codes in one place (`boundary`).
The library never imports this package.
"""

from __future__ import annotations

from vqdoctor.cli.root import app, main

__all__ = ["app", "main"]
