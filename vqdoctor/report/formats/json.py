"""JSON format: exactly `Report.to_dict()` (SPEC.md, schema_version 1), indented."""

from __future__ import annotations

import json
import math
from typing import Any

from vqdoctor.report.formats.base import Format
from vqdoctor.report.model import Report


def _finite(v: Any) -> Any:
    """Belt and braces over `json_value`: no NaN/Inf can reach the output (they become null)."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    return v


class JsonFormat(Format):
    """Machine-readable report: the SPEC's JSON contract, `json.dumps(indent=2)`."""

    name = "json"
    suffix = ".json"

    def render(self, report: Report) -> str:
        """Render `report.to_dict()`; NaN and infinities are emitted as null, never as NaN."""
        return json.dumps(_finite(report.to_dict()), indent=2, ensure_ascii=False,
                          allow_nan=False) + "\n"
