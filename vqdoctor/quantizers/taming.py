"""taming-transformers quantizers and diffusers `VQModel`.

Layouts (P = module path of the quantizer, R = its parent):
  * `EMAVectorQuantizer`: `P.embedding.weight` [K, D], `P.embedding.cluster_size` [K],
    `P.embedding.embed_avg` [K, D] (zero-initialised counts, eps 1e-5).
  * `GumbelQuantize`: `P.proj.weight` [K, hid, 1, 1], `P.proj.bias` [K], `P.embed.weight` [K, D].
  * `VectorQuantizer2` / diffusers `VectorQuantizer`: `P.embedding.weight` [K, D] alone. A bare
    `nn.Embedding` looks the same, so it is claimed only with evidence: `R.quant_conv` /
    `R.post_quant_conv` beside it, or P named like a quantizer; never under a token-embedding name.
"""

from __future__ import annotations

import re

from vqdoctor.checkpoint.base import TensorSource
from vqdoctor.quantizers._common import (
    flag_inconsistent,
    group_prefixes,
    join,
    mismatched,
    unclaimed,
)
from vqdoctor.quantizers._tables import build, is_token_table, looks_quantizer, parent, shape, under
from vqdoctor.quantizers.base import QuantizerState

EPS = 1e-5  # taming EmbeddingEMA default
_DIFFUSERS_KEY = re.compile(r"^(?:en|de)coder\.(?:down_blocks|up_blocks|mid_block|conv_norm_out)\b")
_TAMING_KEY = re.compile(r"^(?:en|de)coder\.(?:down\.\d+\.block|up\.\d+\.block|mid\.block_\d|norm_out)\b")
# What a VectorQuantizer2 / diffusers VectorQuantizer stores (`used` only with `remap`).
_VQ2_KEYS = {"embedding.weight", "used"}


def library_of(src: TensorSource, root: str) -> str:
    """"diffusers", "taming-transformers" or "taming-style", from config or the autoencoder's key names."""
    config = src.meta.get("config")
    if isinstance(config, dict) and ("_diffusers_version" in config or "_class_name" in config):
        return "diffusers"
    rel = under(src, root)
    if any(_DIFFUSERS_KEY.match(k) for k in rel):
        return "diffusers"
    if any(_TAMING_KEY.match(k) for k in rel):
        return "taming-transformers"
    return "taming-style"


class TamingAdapter:
    """Finds taming-transformers and diffusers quantizers."""

    name = "taming"

    def find(self, src: TensorSource, claimed: set[str]) -> list[QuantizerState]:
        """Return every taming / diffusers quantizer in `src` not using a key in `claimed`."""
        used = set(claimed)
        states = [*self._ema(src, used), *self._gumbel(src, used), *self._vq2(src, used)]
        return states

    @staticmethod
    def _take(states: list[QuantizerState], state: QuantizerState, used: set[str]) -> None:
        states.append(state)
        used.update(state.keys.values())

    def _ema(self, src: TensorSource, used: set[str]) -> list[QuantizerState]:
        out: list[QuantizerState] = []
        suffixes = ("embedding.cluster_size", "embedding.weight", "embedding.embed_avg")
        for p in group_prefixes(src.keys(), suffixes):
            cnt, tab, avg = (join(p, s) for s in suffixes)
            kd, n = shape(src, tab, 2), shape(src, cnt, 1)
            if not unclaimed((cnt, tab, avg), used) or not kd or not n or kd[0] < 2:
                continue
            if bad := mismatched(src, {cnt: kd[:1], avg: kd}):
                flag_inconsistent(src, p, tab, bad)
                continue
            self._take(out, build(src, p, "vq-ema", "taming-transformers", tab, counts=cnt,
                                  sums=avg, eps=EPS), used)
        return out

    def _gumbel(self, src: TensorSource, used: set[str]) -> list[QuantizerState]:
        out: list[QuantizerState] = []
        suffixes = ("proj.weight", "proj.bias", "embed.weight")
        for p in group_prefixes(src.keys(), suffixes):
            pw, pb, tab = (join(p, s) for s in suffixes)
            proj, bias, kd = shape(src, pw, 4), shape(src, pb, 1), shape(src, tab, 2)
            if not unclaimed((pw, pb, tab), used) or not (proj and bias and kd) \
                    or not (proj[0] == bias[0] == kd[0] >= 2) or proj[2:] != (1, 1):
                continue
            note = f"Gumbel logits come from {pw} (a 1x1 conv, {proj[1]} channels -> {kd[0]} codes)"
            # The code is argmax(proj(h)), not the nearest `embed` row: probes need the logits layer.
            logits = (src.get_float(pw).reshape(proj[0], proj[1]), src.get_float(pb))
            self._take(out, build(src, p, "gumbel", "taming-transformers", tab, input_dim=proj[1],
                                  claim={"proj.weight": pw, "proj.bias": pb}, notes=[note],
                                  extra={"gumbel_logits": logits}), used)
        return out

    def _vq2(self, src: TensorSource, used: set[str]) -> list[QuantizerState]:
        out: list[QuantizerState] = []
        for p in group_prefixes(src.keys(), ("embedding.weight",)):
            tab = join(p, "embedding.weight")
            kd, root = shape(src, tab, 2), parent(p)
            if not p or tab in used or not kd or kd[0] < 2 or is_token_table(tab):
                continue
            convs = [join(root, c) for c in ("quant_conv.weight", "post_quant_conv.weight")]
            if not (any(c in src.infos for c in convs) or looks_quantizer(p)):
                continue
            if not set(under(src, p)) <= _VQ2_KEYS:
                continue  # more state than a VectorQuantizer2 holds: leave it to the generic adapter
            library = library_of(src, root)
            notes = [] if library != "taming-style" else [
                f"{p} read as a taming-style VectorQuantizer2 from its key names; library unknown"]
            self._take(out, build(src, p, "vq", library, tab, notes=notes), used)
        return out


ADAPTER = TamingAdapter()
