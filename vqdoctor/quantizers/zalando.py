"""zalando `VectorQuantizerEMA` and `VectorQuantizer` (the VQ-VAE notebook ported to PyTorch).

  * EMA: `P._embedding.weight` [K, D], `P._ema_cluster_size` [K] (a buffer that already holds the
    Laplace-smoothed counts), `P._ema_w` [K, D] (a Parameter re-created every training step).
  * Gradient-trained: `P._embedding.weight` [K, D] and nothing else under P.
"""

from __future__ import annotations

from vqdoctor.checkpoint.base import TensorSource
from vqdoctor.quantizers._common import (
    flag_inconsistent,
    group_prefixes,
    join,
    mismatched,
    unclaimed,
)
from vqdoctor.quantizers._tables import build, is_token_table, shape, under
from vqdoctor.quantizers.base import QuantizerState

EPS = 1e-5  # zalando notebook default
_TABLE = "_embedding.weight"
_EMA = (_TABLE, "_ema_cluster_size", "_ema_w")


class ZalandoAdapter:
    """Finds zalando VQ-VAE quantizers."""

    name = "zalando"

    def find(self, src: TensorSource, claimed: set[str]) -> list[QuantizerState]:
        """Return every zalando quantizer in `src` not using a key in `claimed`."""
        states: list[QuantizerState] = []
        for p in group_prefixes(src.keys(), (_TABLE,)):
            tab, cnt, ema_w = (join(p, s) for s in _EMA)
            kd = shape(src, tab, 2)
            if tab in claimed or not kd or kd[0] < 2 or is_token_table(tab):
                continue
            rest = set(under(src, p))
            if rest == set(_EMA) and unclaimed((cnt, ema_w), claimed) \
                    and (bad := mismatched(src, {cnt: kd[:1], ema_w: kd})):
                flag_inconsistent(src, p, tab, bad)
            elif rest == set(_EMA) and unclaimed((cnt, ema_w), claimed) \
                    and shape(src, cnt, 1) == kd[:1] and shape(src, ema_w, 2) == kd:
                states.append(build(src, p, "vq-ema", "zalando", tab, counts=cnt, sums=ema_w,
                                    counts_smoothed=True, eps=EPS, notes=[
                                        f"{cnt} already holds Laplace-smoothed counts"]))
            elif rest == {_TABLE}:
                states.append(build(src, p, "vq", "zalando", tab))
        return states


ADAPTER = ZalandoAdapter()
