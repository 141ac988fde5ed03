"""descript-audio-codec and transformers DAC: factorised, l2-normalised lookup, gradient-trained.

Layouts (docs/ema-and-layouts.md#state-dict-layouts): `GROUP.quantizers.{q}.codebook.weight` [K, D]
with the input projection `...in_proj` (1x1 Conv1d) stored as `weight_g`/`weight_v`/`bias`
(descript, torch weight_norm), plain `weight` [D, dim, 1] (transformers), or
`parametrizations.weight.original0/original1` (transformers after `apply_weight_norm()`). The lookup
compares l2-normalised vectors: metric "cosine"; the stored codebook itself is not normalised.
"""

from __future__ import annotations

from vqdoctor.checkpoint.base import TensorSource
from vqdoctor.quantizers._common import (
    Roles,
    apply_config,
    as_hkd,
    group_prefixes,
    join,
    read_projection,
    split_stage,
    unclaimed,
)
from vqdoctor.quantizers.base import QuantizerState

# How the in_proj weight (or its direction `v`) is stored: plain, torch weight_norm, parametrizations.
WEIGHTS = ("in_proj.weight", "in_proj.weight_v", "in_proj.parametrizations.weight.original1")


class _Dac:
    """Adapter for DAC quantizers (descript-audio-codec and transformers)."""

    name = "dac"

    def find(self, src: TensorSource, claimed: set[str]) -> list[QuantizerState]:
        """Every DAC-style quantizer (codebook + 1x1-conv `in_proj`) in `src`."""
        out: list[QuantizerState] = []
        for name in group_prefixes(src.keys(), ("codebook.weight", "in_proj.bias")):
            key, pin = join(name, "codebook.weight"), join(name, "in_proj")
            shape = src.infos[key].shape
            own = [k for k in src.infos if k.startswith(pin + ".")] + [key]
            weights = [src.infos[k].shape for k in own if k.endswith(WEIGHTS)]
            # the projection must map onto the code dimension (checked before reading anything)
            fits = len(shape) == 2 and bool(weights) and weights[0][0] == shape[1]
            if not fits or not unclaimed(own, claimed):
                continue
            r, (group, stage) = Roles(src), split_stage(name, "quantizers")
            proj = read_projection(r, pin)
            if proj is None:
                continue
            library = "descript-audio-codec" if join(pin, "weight_g") in src.infos else "transformers"
            st = QuantizerState(
                name, "vq", library, int(shape[0]), int(shape[1]),
                codebook=as_hkd(r.read("codebook", key)), metric="cosine", group=group, stage=stage,
                project_in=proj[:2], input_dim=int(proj[0].shape[1]))
            if proj[2]:
                st.extra["weight_norm"] = True
            r.claim_under("out_proj", join(name, "out_proj"))
            apply_config(src, st)
            st.keys, st.dtypes = r.keys, r.dtypes
            out.append(st)
        return out


ADAPTER = _Dac()
