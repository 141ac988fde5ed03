"""JSON gate format: `GateResult.to_dict()` (schema_version 1), the report under `report`."""

from __future__ import annotations

import json

from vqdoctor.gate import GateResult
from vqdoctor.gate_formats.base import GateFormat
from vqdoctor.rules.base import json_value


class JsonGateFormat(GateFormat):
    """Machine-readable gate result; NaN and infinities are emitted as null."""

    name = "json"
    suffix = ".json"

    def render(self, result: GateResult) -> str:
        """Render `result.to_dict()`, indented."""
        return json.dumps(json_value(result.to_dict()), indent=2, ensure_ascii=False,
                          allow_nan=False) + "\n"
