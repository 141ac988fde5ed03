"""JSON formats: exactly `Report.to_dict()` / `GateResult.to_dict()` (schema_version 1), indented."""

from __future__ import annotations

import json
import math
from typing import Any

from vqdoctor.formats.base import Format
from vqdoctor.gate import GateResult
from vqdoctor.results.model import Report
from vqdoctor.rules.base import json_value


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
    """Machine-readable report: the JSON contract, `json.dumps(indent=2)`.

    Contract: docs/contract.md#the-json-report.
    """

    name = "json"
    suffix = ".json"
    result = "report"

    def render(self, report: Report) -> str:
        """Render `report.to_dict()`; NaN and infinities are emitted as null, never as NaN."""
        return json.dumps(_finite(report.to_dict()), indent=2, ensure_ascii=False,
                          allow_nan=False) + "\n"


class JsonGateFormat(Format):
    """Machine-readable gate result (the report under `report`); NaN and infinities are null."""

    name = "json"
    suffix = ".json"
    result = "gate"

    def render(self, result: GateResult) -> str:
        """Render `result.to_dict()`, indented."""
        return json.dumps(json_value(result.to_dict()), indent=2, ensure_ascii=False,
                          allow_nan=False) + "\n"
