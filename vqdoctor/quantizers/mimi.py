"""Mimi (transformers, and kyutai's moshi): split residual quantizer with `embed_sum` /
`cluster_usage` codebooks.

Layout (docs/ema-and-layouts.md#state-dict-layouts):
`GROUP.layers.{q}.codebook.{initialized,cluster_usage,embed_sum}` with GROUP e.g.
`quantizer.semantic_residual_vector_quantizer` and `...acoustic_residual_vector_quantizer`
(separate groups), and `GROUP.input_proj.weight` / `GROUP.output_proj.weight` 1x1 Conv1d
([D, dim, 1], no bias) shared by every stage. The lookup table is
`embed_sum / clamp(cluster_usage, 1e-5)` (no Laplace smoothing).

kyutai's moshi (the original Mimi, and repositories built on it, e.g. RSTnet) names the same
buffers `GROUP.vq.layers.{q}._codebook.{_initialized,cluster_usage,embedding_sum}`, with GROUP
e.g. `quantizer.rvq_first` / `quantizer.rvq_rest` holding `input_proj` / `output_proj`.
"""

from __future__ import annotations

from vqdoctor.checkpoint.base import TensorSource
from vqdoctor.quantizers._common import (
    Roles,
    apply_config,
    as_hk,
    as_hkd,
    flag_inconsistent,
    group_prefixes,
    join,
    mismatched,
    read_projection,
    split_stage,
    unclaimed,
)
from vqdoctor.quantizers.base import QuantizerState

EPS = 1e-5
BUFFERS = ("embed_sum", "cluster_usage", "initialized")
# (library, codebook module, sum, usage, flag): transformers' names, then moshi's
LAYOUTS = (("transformers", "codebook", "embed_sum", "cluster_usage", "initialized"),
           ("moshi", "_codebook", "embedding_sum", "cluster_usage", "_initialized"))


class _Mimi:
    """Adapter for transformers Mimi codebooks."""

    name = "mimi"

    def find(self, src: TensorSource, claimed: set[str]) -> list[QuantizerState]:
        """Every Mimi codebook in `src`, one state per residual stage."""
        out: list[QuantizerState] = []
        for library, cb, sum_name, usage_name, flag_name in LAYOUTS:
            names = (sum_name, usage_name, flag_name)
            for name in group_prefixes(src.keys(), [f"{cb}.{b}" for b in names]):
                keys = dict(zip(BUFFERS, (join(name, f"{cb}.{b}") for b in names), strict=True))
                st = self._state(src, claimed, name, keys, library)
                if st is not None:
                    out.append(st)
                    claimed = claimed | set(st.keys.values())
        return out


    @staticmethod
    def _state(src: TensorSource, claimed: set[str], name: str, keys: dict[str, str],
               library: str) -> QuantizerState | None:
        shape = src.infos[keys["embed_sum"]].shape
        if len(shape) != 2 or not unclaimed(keys.values(), claimed):
            return None
        if bad := mismatched(src, {keys["cluster_usage"]: shape[:1]}):
            flag_inconsistent(src, name, keys["embed_sum"], bad)
            return None
        r, (group, stage) = Roles(src), split_stage(name)
        usage = r.read("cluster_size", keys["cluster_usage"])
        embed_sum = r.read("embed_avg", keys["embed_sum"])
        r.claim("codebook", keys["embed_sum"])  # the lookup table is derived from embed_sum
        st = QuantizerState(
            name, "vq-ema", library, int(shape[0]), int(shape[1]),
            codebook=as_hkd(embed_sum / usage.clamp(min=EPS)[:, None]),
            cluster_size=as_hk(usage), embed_avg=as_hkd(embed_sum), eps=EPS,
            initted=bool(r.read("initted", keys["initialized"]).flatten()[0] > 0),
            group=group, stage=stage, input_dim=int(shape[1]),
            extra={"codebook_formula": "embed_sum / clamp(cluster_usage, eps)"})
        # the projections sit on the group (transformers) or above its `vq` (moshi)
        owner = group if library == "transformers" or group is None else group.rpartition(".")[0]
        proj = read_projection(r, join(owner, "input_proj")) if owner is not None else None
        if proj is not None:
            st.project_in, st.input_dim = proj[:2], int(proj[0].shape[1])
            r.claim_under("output_proj", join(owner, "output_proj"))
        apply_config(src, st)
        st.keys, st.dtypes = r.keys, r.dtypes
        return st


ADAPTER = _Mimi()
