"""encodec / audiocraft `core_vq` and transformers EnCodec (and its Xcodec/WavTokenizer relatives).

Layouts (docs/ema-and-layouts.md#state-dict-layouts): encodec/audiocraft
`P._codebook.{inited,cluster_size,embed,embed_avg}` with an optional per-stage `P.project_in`
(Linear); transformers `P.codebook.{inited,cluster_size,embed,embed_avg}`. `embed` is [K, D], counts
[K] (zero-initialised), eps 1e-5. Stages of a residual quantizer are `GROUP.layers.{q}` (e.g.
`quantizer.vq.layers.3`, `quantizer.layers.3`).
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
# (sub-module holding the buffers, library)
LAYOUTS = (("_codebook", "encodec"), ("codebook", "transformers"))
BUFFERS = ("embed", "inited", "cluster_size", "embed_avg")


class _Encodec:
    """Adapter for encodec/audiocraft core_vq and transformers EnCodec codebooks."""

    name = "encodec"

    def find(self, src: TensorSource, claimed: set[str]) -> list[QuantizerState]:
        """Every EuclideanCodebook-style quantizer in `src`."""
        out: list[QuantizerState] = []
        for sub, library in LAYOUTS:
            for name in group_prefixes(src.keys(), [f"{sub}.{b}" for b in BUFFERS]):
                keys = {b: join(name, f"{sub}.{b}") for b in BUFFERS}
                table = tuple(src.infos[keys["embed"]].shape)
                if len(table) != 2 or not unclaimed(keys.values(), claimed):
                    continue
                if bad := mismatched(src, {keys["cluster_size"]: table[:1], keys["embed_avg"]: table}):
                    flag_inconsistent(src, name, keys["embed"], bad)
                    continue
                r, (group, stage) = Roles(src), split_stage(name)
                embed = as_hkd(r.read("codebook", keys["embed"]))
                st = QuantizerState(
                    name, "vq-ema", library, int(embed.shape[1]), int(embed.shape[2]), codebook=embed,
                    cluster_size=as_hk(r.read("cluster_size", keys["cluster_size"])),
                    embed_avg=as_hkd(r.read("embed_avg", keys["embed_avg"])),
                    initted=bool(r.read("initted", keys["inited"]).flatten()[0] > 0),
                    eps=EPS, group=group, stage=stage, input_dim=int(embed.shape[2]))
                proj = read_projection(r, join(name, "project_in"))
                if proj is not None:
                    st.project_in, st.input_dim = proj[:2], int(proj[0].shape[1])
                    r.claim_under("project_out", join(name, "project_out"))
                if library == "encodec" and src.container.startswith("best_state"):
                    st.extra["variant"] = "audiocraft"  # same core_vq code and layout as encodec
                apply_config(src, st)
                st.keys, st.dtypes = r.keys, r.dtypes
                out.append(st)
        return out


ADAPTER = _Encodec()
