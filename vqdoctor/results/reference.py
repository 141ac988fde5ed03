"""Published codebook utilisation figures, to read a quantizer's usage against (info, not judgement).

Each entry is a figure a paper or its authors' repository printed, with where it is printed.
Utilisation there is dataset-level: the share of the K codes used at least once over the
evaluation set, which a windowed `usage_window` approaches once the window holds enough tokens.
Figures that could not be traced to a table, an abstract or the authors' README are left out
(no published per-K perplexity figures were found, so there are none; a uniform codebook has
perplexity K). Background and the figures' provenance: docs/integrations.md#reference-values.

`reference_for(info)` picks the entries of the quantizer's family (vector VQ, FSQ, LFQ, SimVQ)
closest in codebook size; the report carries them per quantizer (`QuantizerReport.reference`).
"""

from __future__ import annotations

import math
from typing import Any

SIMVQ_T1 = "Zhu et al. 2024, SimVQ (arXiv:2411.02038), Table 1; ImageNet 128x128"
VQGAN_LC = "Zhu et al. 2024, VQGAN-LC (arXiv:2406.11837)"

REFERENCES: tuple[dict[str, Any], ...] = (
    {"family": "vq", "model": "VQGAN", "codebook_size": 65536, "utilization": 0.014,
     "source": SIMVQ_T1},
    {"family": "vq", "model": "VQGAN", "codebook_size": 65536, "utilization": 0.045,
     "source": SIMVQ_T1},
    {"family": "vq", "model": "VQGAN-FC (factorized codes)", "codebook_size": 65536,
     "utilization": 1.0, "source": SIMVQ_T1},
    {"family": "vq", "model": "VQGAN-FC (factorized codes)", "codebook_size": 16384,
     "utilization": 0.12, "qualifier": "<", "source": f"{VQGAN_LC}, abstract; ImageNet"},
    {"family": "vq", "model": "VQGAN-LC (frozen init codebook + projector)",
     "codebook_size": 100000, "utilization": 0.999,
     "source": f"{VQGAN_LC}, authors' README, f16 tokenizer; ImageNet"},
    {"family": "vq", "model": "VQGAN-LC", "codebook_size": 65536, "utilization": 1.0,
     "source": SIMVQ_T1},
    {"family": "vq", "model": "LlamaGen VQ-16 (8-d l2-normalised codes)", "codebook_size": 16384,
     "utilization": 0.97, "source": "Sun et al. 2024, LlamaGen (arXiv:2406.06525), abstract; ImageNet"},
    {"family": "fsq", "model": "FSQ", "codebook_size": 64000, "utilization": 1.0,
     "source": SIMVQ_T1},
    {"family": "fsq", "model": "FSQ (MaskGIT, UViM)", "codebook_size": None, "utilization": 1.0,
     "qualifier": "~", "note": "for most models",
     "source": "Mentzer et al. 2023, FSQ (arXiv:2309.15505), Sec. 1"},
    {"family": "lfq", "model": "LFQ", "codebook_size": 65536, "utilization": 1.0,
     "source": SIMVQ_T1},
    {"family": "lfq", "model": "Open-MAGVIT2 (LFQ)", "codebook_size": 262144, "utilization": 1.0,
     "source": "Luo et al. 2024, Open-MAGVIT2 (arXiv:2409.04410), authors' README; ImageNet 256x256"},
    {"family": "simvq", "model": "SimVQ", "codebook_size": 65536, "utilization": 1.0,
     "source": SIMVQ_T1},
    {"family": "simvq", "model": "SimVQ", "codebook_size": 262144, "utilization": 1.0,
     "source": SIMVQ_T1},
)
"""The published figures; `family` is what `family_of` maps a quantizer kind to."""

FAMILY = {"vq-ema": "vq", "vq": "vq", "gumbel": "vq", "simvq": "simvq", "fsq": "fsq", "lfq": "lfq"}
NEAR = 4.0  # a codebook within a factor 4 of K counts as "that size"
FAR = 64.0  # beyond this factor a published figure says nothing about this codebook
MAX_ENTRIES = 3


def family_of(kind: str | None) -> str | None:
    """The reference family of a quantizer kind (None for kinds without published figures)."""
    return FAMILY.get(str(kind or ""))


def reference_for(info: dict[str, Any], limit: int = MAX_ENTRIES) -> list[dict[str, Any]]:
    """Published figures for a quantizer of this kind and codebook size, closest size first.

    Entries whose K is within a factor `NEAR` of the quantizer's, or the nearest ones when none
    is that close but one is within `FAR` (with their K, so a reader sees the difference), then
    family-wide statements.

    Args:
        info: the quantizer's identity (`kind`, `codebook_size`), as in `QuantizerReport.info`.
        limit: at most this many entries.

    Returns:
        JSON-native dicts (model, codebook_size, utilization, qualifier?, note?, source);
        [] for kinds without published figures.
    """
    fam = family_of(info.get("kind"))
    if fam is None:
        return []
    k = int(info.get("codebook_size") or 0)
    sized = [r for r in REFERENCES if r["family"] == fam and r["codebook_size"]]
    general = [r for r in REFERENCES if r["family"] == fam and not r["codebook_size"]]
    if k > 0 and sized:
        def dist(r: dict[str, Any]) -> float:
            return abs(math.log(r["codebook_size"] / k))

        sized.sort(key=dist)
        close = [r for r in sized if dist(r) <= math.log(NEAR)]
        nearest = [r for r in sized if dist(r) == dist(sized[0]) and dist(r) <= math.log(FAR)]
        sized = close or nearest
    picked = (sized + general)[:limit]
    return [{key: v for key, v in r.items() if key != "family"} for r in picked]


__all__ = ["FAMILY", "REFERENCES", "family_of", "reference_for"]
