"""rosinality VQ-VAE-2 `Quantize`: `P.embed` [dim, n_embed] (transposed), `P.cluster_size` [n_embed],
`P.embed_avg` [dim, n_embed].

The same three names in [K, D] orientation are other libraries' (and the generic adapter's), so a
table is claimed only when the count vector matches its *second* axis. A square table is decided
by the EMA invariant, or by the `quantize_t` / `quantize_b` names when the invariant cannot tell.
Top and bottom quantizers are separate states (no group); their level is noted.
"""

from __future__ import annotations

import re

from vqdoctor.checkpoint.base import TensorSource
from vqdoctor.quantizers._common import flag_inconsistent, group_prefixes, join, unclaimed
from vqdoctor.quantizers._tables import build, invariant_orientation, orientation, shape, under
from vqdoctor.quantizers.base import QuantizerState

EPS = 1e-5  # rosinality Quantize default
_SUFFIXES = ("embed", "cluster_size", "embed_avg")
_LEVEL = re.compile(r"(?:^|\.)quantize_([tmb])$")
_LEVEL_NAMES = {"t": "top", "m": "middle", "b": "bottom"}


class RosinalityAdapter:
    """Finds rosinality VQ-VAE-2 `Quantize` modules (top, bottom, or any level)."""

    name = "rosinality"

    def find(self, src: TensorSource, claimed: set[str]) -> list[QuantizerState]:
        """Return every transposed `Quantize` table in `src` not using a key in `claimed`."""
        states: list[QuantizerState] = []
        for p in group_prefixes(src.keys(), _SUFFIXES):
            tab, cnt, avg = (join(p, s) for s in _SUFFIXES)
            dk, n = shape(src, tab, 2), shape(src, cnt, 1)
            if not unclaimed((tab, cnt, avg), claimed) or not dk or not n \
                    or set(under(src, p)) != set(_SUFFIXES):
                continue  # `Quantize` stores exactly these three buffers
            bad: dict[str, tuple[int, ...] | str] = {}
            if n[0] not in dk:  # counts of a length that is neither side of the table
                bad[cnt] = f"[{dk[1]}] or [{dk[0]}]"
            if shape(src, avg, 2) != dk:
                bad[avg] = dk
            if bad:
                flag_inconsistent(src, p, tab, bad)
                continue
            notes = []
            way = orientation(dk, n[0])
            level = _LEVEL.search(p)
            if way == "square":
                way = invariant_orientation(src, tab, avg) or ("dk" if level else None)
                notes.append(f"{p}.embed is square ({dk[0]}x{dk[1]}): read as [dim, n_embed] "
                             "like rosinality's Quantize")
            if way != "dk" or dk[1] < 2:
                continue
            if level:
                notes.append(f"{p} is the {_LEVEL_NAMES[level.group(1)]} level of a VQ-VAE-2 hierarchy")
            states.append(build(src, p, "vq-ema", "rosinality", tab, transposed=True, counts=cnt,
                                sums=avg, eps=EPS, notes=notes))
        return states


ADAPTER = RosinalityAdapter()
