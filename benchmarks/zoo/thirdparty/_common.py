"""Shared by the third-party cases: the reference recorder of the generated zoo and a seed helper.

The cases re-implement public repositories' models and loops in this project's own code; only
the measuring (`gen/reference.py`, which never imports vqdoctor) is shared.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "gen"))
from reference import Recorder  # noqa: E402

__all__ = ["Recorder", "write_reference"]


def write_reference(out: Path, rec: Recorder, final_codebook, files: dict, extra: dict | None = None) -> None:
    """reference.json of a case (the same schema as the generated variants')."""
    result = rec.result(final_codebook, {"files": files, **(extra or {})})
    (out / "reference.json").write_text(json.dumps(result))
