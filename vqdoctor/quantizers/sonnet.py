"""Sonnet-style EMA quantizers ported to PyTorch, torchmultimodal `Codebook`, VideoGPT/TATS `Codebook`.

  * Sonnet `VectorQuantizerEMA`: `P.embeddings` [D, K] (transposed), `P.ema_cluster_size.{hidden,
    average,_counter}` [K], `P.ema_dw.{hidden,average,_counter}` [D, K]. The EMA is debiased:
    `average = hidden / (1 - decay^counter)` is what the codebook is computed from, so `average`
    is read as the counts and sums; `hidden` and the counters are claimed.
  * torchmultimodal: `P.embedding` [K, D], `P.code_usage` [K] (already smoothed), `P.code_avg` [K, D].
  * VideoGPT / TATS: `P.embeddings` [K, D], `P.N` [K], `P.z_avg` [K, D].
"""

from __future__ import annotations

from vqdoctor.checkpoint.base import TensorSource
from vqdoctor.quantizers._common import flag_inconsistent, group_prefixes, join, unclaimed
from vqdoctor.quantizers._tables import build, invariant_orientation, orientation, shape
from vqdoctor.quantizers.base import QuantizerState

SONNET_EPS = 1e-5
TMM_EPS = VIDEOGPT_EPS = 1e-7
_SONNET = ("embeddings", "ema_cluster_size.average", "ema_dw.average")
_TMM = ("embedding", "code_usage", "code_avg")
_VIDEOGPT = ("embeddings", "N", "z_avg")


def _orient(src: TensorSource, tab: str, cnt: str, avg: str, square: str) -> str | None:
    """Table orientation from the count length; `square` (or the EMA invariant) decides K == D."""
    table, counts = shape(src, tab, 2), shape(src, cnt, 1)
    if not table or not counts or shape(src, avg, 2) != table or table[0] < 2 or table[1] < 2:
        return None
    way = orientation(table, counts[0])
    return (invariant_orientation(src, tab, avg) or square) if way == "square" else way


def _inconsistent(src: TensorSource, p: str, tab: str, cnt: str, avg: str) -> bool:
    """Flag (and return True for) counts or sums that cannot belong to the table."""
    table, counts = shape(src, tab, 2), shape(src, cnt, 1)
    if not table or not counts:
        return False
    bad: dict[str, tuple[int, ...] | str] = {}
    if counts[0] not in table:
        bad[cnt] = f"[{table[0]}] or [{table[1]}]"
    if shape(src, avg, 2) != table:
        bad[avg] = table
    if bad:
        flag_inconsistent(src, p, tab, bad)
    return bool(bad)


class SonnetAdapter:
    """Finds Sonnet-style, torchmultimodal and VideoGPT EMA codebooks."""

    name = "sonnet"

    def find(self, src: TensorSource, claimed: set[str]) -> list[QuantizerState]:
        """Return every such codebook in `src` not using a key in `claimed`."""
        used, states = set(claimed), []
        for suffixes, library, eps, smoothed, native in (
                (_SONNET, "sonnet", SONNET_EPS, False, "dk"),
                (_TMM, "torchmultimodal", TMM_EPS, True, "kd"),
                (_VIDEOGPT, "videogpt", VIDEOGPT_EPS, False, "kd")):
            for p in group_prefixes(src.keys(), suffixes):
                tab, cnt, avg = (join(p, s) for s in suffixes)
                if unclaimed((tab, cnt, avg), used) and _inconsistent(src, p, tab, cnt, avg):
                    continue
                way = _orient(src, tab, cnt, avg, native)
                claim = self._sonnet_claims(src, p) if library == "sonnet" else {}
                if way is None or not unclaimed((tab, cnt, avg, *claim.values()), used):
                    continue
                notes = [] if way == native else [f"{tab} is stored in {way[0].upper()}, "
                                                  f"{way[1].upper()} order, unlike {library}'s default"]
                if smoothed:
                    notes.append(f"{cnt} already holds Laplace-smoothed counts")
                if library == "sonnet":
                    notes.append("Sonnet EMA is debiased: counts and sums are the `average` buffers")
                state = build(src, p, "vq-ema", library, tab, transposed=way == "dk", counts=cnt,
                              sums=avg, claim=claim, eps=eps, counts_smoothed=smoothed, notes=notes)
                states.append(state)
                used.update(state.keys.values())
        return states

    @staticmethod
    def _sonnet_claims(src: TensorSource, p: str) -> dict[str, str]:
        """The biased accumulators and step counters of Sonnet's two EMA modules."""
        out = {}
        for ema in ("ema_cluster_size", "ema_dw"):
            for leaf in ("hidden", "_counter", "counter"):
                key = join(p, f"{ema}.{leaf}")
                if key in src.infos:
                    out[f"{ema}.{leaf}"] = key
        return out


ADAPTER = SonnetAdapter()
