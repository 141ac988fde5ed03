"""transformers Mimi: split residual quantizer with `embed_sum` / `cluster_usage` codebooks.

Layout (docs/ema-and-layouts.md#state-dict-layouts):
`GROUP.layers.{q}.codebook.{initialized,cluster_usage,embed_sum}` with GROUP e.g.
`quantizer.semantic_residual_vector_quantizer` and `...acoustic_residual_vector_quantizer`
(separate groups), and `GROUP.input_proj.weight` / `GROUP.output_proj.weight` 1x1 Conv1d
([D, dim, 1], no bias) shared by every stage. The lookup table is
`embed_sum / clamp(cluster_usage, 1e-5)` (no Laplace smoothing).
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


class _Mimi:
    """Adapter for transformers Mimi codebooks."""

    name = "mimi"

    def find(self, src: TensorSource, claimed: set[str]) -> list[QuantizerState]:
        """Every Mimi codebook in `src`, one state per residual stage."""
        out: list[QuantizerState] = []
        for name in group_prefixes(src.keys(), [f"codebook.{b}" for b in BUFFERS]):
            keys = {b: join(name, f"codebook.{b}") for b in BUFFERS}
            shape = src.infos[keys["embed_sum"]].shape
            if len(shape) != 2 or not unclaimed(keys.values(), claimed):
                continue
            if bad := mismatched(src, {keys["cluster_usage"]: shape[:1]}):
                flag_inconsistent(src, name, keys["embed_sum"], bad)
                continue
            r, (group, stage) = Roles(src), split_stage(name)
            usage = r.read("cluster_size", keys["cluster_usage"])
            embed_sum = r.read("embed_avg", keys["embed_sum"])
            r.claim("codebook", keys["embed_sum"])  # the lookup table is derived from embed_sum
            st = QuantizerState(
                name, "vq-ema", "transformers", int(shape[0]), int(shape[1]),
                codebook=as_hkd(embed_sum / usage.clamp(min=EPS)[:, None]),
                cluster_size=as_hk(usage), embed_avg=as_hkd(embed_sum), eps=EPS,
                initted=bool(r.read("initted", keys["initialized"]).flatten()[0] > 0),
                group=group, stage=stage, input_dim=int(shape[1]),
                extra={"codebook_formula": "embed_sum / clamp(cluster_usage, eps)"})
            proj = read_projection(r, join(group, "input_proj")) if group is not None else None
            if proj is not None:
                st.project_in, st.input_dim = proj[:2], int(proj[0].shape[1])
                r.claim_under("output_proj", join(group, "output_proj"))
            apply_config(src, st)
            st.keys, st.dtypes = r.keys, r.dtypes
            out.append(st)
        return out


ADAPTER = _Mimi()
