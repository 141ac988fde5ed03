"""Probe loading, mapping onto quantizers (incl. residual chaining) and probe metrics."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from vqdoctor.errors import ProbeError
from vqdoctor.metrics import functional as F
from vqdoctor.metrics.names import CODEBOOK, PROBE
from vqdoctor.metrics.probe import load_probe, probe_inputs, probe_metrics
from vqdoctor.quantizers.base import QuantizerState

# Run again against every supported vector-quantize-pytorch release (.ci/run's version matrix).
pytestmark = pytest.mark.library

vqp = pytest.importorskip("vector_quantize_pytorch")


def vq_state(codebook, name="quantizer", metric="euclidean", library="generic", **kw) -> QuantizerState:
    cb = F.as_hkd(codebook)
    return QuantizerState(name, "vq", library, cb.shape[1], cb.shape[2], codebook=cb, metric=metric, **kw)


# -- loading ---------------------------------------------------------------------------------


def test_load_formats(tmp_path):
    z = torch.randn(10, 4)
    torch.save(z, tmp_path / "z.pt")
    torch.save({"z": {"a": z, "b": z * 2}}, tmp_path / "nested.pt")
    np.save(tmp_path / "z.npy", z.numpy())
    np.savez(tmp_path / "z.npz", enc=z.numpy())
    from safetensors.torch import save_file
    save_file({"probe": z}, str(tmp_path / "z.safetensors"))

    assert torch.equal(load_probe(str(tmp_path / "z.pt")), z)
    nested = load_probe(str(tmp_path / "nested.pt"))
    assert set(nested) == {"a", "b"} and torch.equal(nested["b"], z * 2)
    assert torch.equal(load_probe(str(tmp_path / "z.npy")), z)
    assert torch.equal(load_probe(str(tmp_path / "z.npz"))["enc"], z)
    assert torch.equal(load_probe(str(tmp_path / "z.safetensors")), z)
    torch.save(z.half(), tmp_path / "h.pt")
    assert load_probe(str(tmp_path / "h.pt")).dtype == torch.float32


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_bad_probes_get_one_clear_line(tmp_path):
    evil = _Evil()
    evil.marker = str(tmp_path / "pwned")
    torch.save({"z": evil}, tmp_path / "evil.pt")
    (tmp_path / "junk.pt").write_bytes(os.urandom(256))
    (tmp_path / "empty.npy").write_bytes(b"")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    torch.save({"steps": 3}, tmp_path / "nodata.pt")
    torch.save(torch.empty(0, 4), tmp_path / "void.pt")
    for name in ("evil.pt", "junk.pt", "empty.npy", "obj.npy", "nodata.pt", "void.pt", "missing.pt", "."):
        with pytest.raises(ProbeError) as err:
            load_probe(str(tmp_path / name))
        assert "\n" not in str(err.value) and "probe" in str(err.value)
    assert not (tmp_path / "pwned").exists()


# -- mapping ---------------------------------------------------------------------------------


def test_shapes_are_flattened_to_the_expected_dim():
    q = vq_state(torch.randn(8, 6))
    x = torch.randn(2, 5, 6)  # channels-last
    assert torch.equal(probe_inputs(x, [q], path="z.pt")["quantizer"], x.reshape(-1, 6))
    y = torch.randn(2, 6, 3, 4)  # channels-first image feature map
    assert torch.equal(probe_inputs(y, [q], path="z.pt")["quantizer"], y.movedim(1, -1).reshape(-1, 6))
    # [B, C, T] with T == C is ambiguous: conv codecs read it channels-first, lucidrains channels-last
    sq = torch.randn(2, 6, 6)
    codec = vq_state(torch.randn(8, 6), library="encodec")
    assert torch.equal(probe_inputs(sq, [codec], path="z.pt")["quantizer"], sq.movedim(1, -1).reshape(-1, 6))
    luc = vq_state(torch.randn(8, 6), library="vector-quantize-pytorch")
    assert torch.equal(probe_inputs(sq, [luc], path="z.pt")["quantizer"], sq.reshape(-1, 6))


def test_nothing_fits_names_shape_and_expected_dims():
    q = vq_state(torch.randn(8, 128))
    with pytest.raises(ProbeError, match=r"^probe z.pt has dim 64; quantizers expect: quantizer \(128\)$"):
        probe_inputs(torch.randn(10, 64), [q], path="z.pt")
    with pytest.raises(ProbeError, match=r"shape \[2, 64, 3\]"):
        probe_inputs(torch.randn(2, 64, 3), [q], path="z.pt")


def test_dict_probes_match_names_exactly_or_by_unique_suffix():
    a = vq_state(torch.randn(4, 3), name="model.quantize_t")
    b = vq_state(torch.randn(4, 5), name="model.quantize_b")
    za, zb = torch.randn(7, 3), torch.randn(9, 5)
    got = probe_inputs({"model.quantize_t": za, "quantize_b": zb}, [a, b], path="p.pt")
    assert torch.equal(got["model.quantize_t"], za) and torch.equal(got["model.quantize_b"], zb)
    # a single unnamed entry is read as one tensor
    assert set(probe_inputs({"encoder_out": za}, [a, b], path="p.pt")) == {"model.quantize_t"}
    # entries that name no quantizer are matched by shape (see test_dict_probes_match_by_shape)
    got = probe_inputs({"x": za, "y": zb}, [a, b], path="p.pt")
    assert torch.equal(got["model.quantize_t"], za) and torch.equal(got["model.quantize_b"], zb)
    with pytest.raises(ProbeError, match="none names a quantizer or fits one by shape"):
        probe_inputs({"x": torch.randn(7, 4), "y": zb[:, :2]}, [a, b], path="p.pt")


def test_project_in_is_applied():
    w, bias = torch.randn(4, 10), torch.randn(4)
    q = vq_state(torch.randn(8, 4), project_in=(w, bias), input_dim=10)
    z = torch.randn(30, 10)
    got = probe_inputs(z, [q], path="z.pt")["quantizer"]
    assert torch.allclose(got, z @ w.T + bias)
    assert probe_metrics(q, z) == probe_metrics(q, got, projected=True)


def _rvq_states(rvq, name="rvq"):
    sd = rvq.state_dict()
    pin = (sd["project_in.weight"], sd["project_in.bias"]) if "project_in.weight" in sd else None
    out = []
    for i in range(len(rvq.layers)):
        cb = sd[f"layers.{i}._codebook.embed"]
        out.append(QuantizerState(f"{name}.layers.{i}", "vq-ema", "vector-quantize-pytorch", cb.shape[1],
                                  cb.shape[2], codebook=cb, group=name, stage=i, project_in=pin,
                                  input_dim=rvq.project_in.in_features if pin else cb.shape[2]))
    return out


@pytest.mark.parametrize("codebook_dim", [None, 8])
def test_residual_chaining_matches_lucidrains_residual_vq(codebook_dim):
    torch.manual_seed(0)
    rvq = vqp.ResidualVQ(dim=32, codebook_size=16, num_quantizers=3, codebook_dim=codebook_dim).eval()
    x = torch.randn(4, 50, 32)
    with torch.no_grad():
        _, indices, _ = rvq(x)
    states = _rvq_states(rvq)
    got = probe_inputs(x, states, path="x.pt")
    assert set(got) == {s.name for s in states}
    for i in (1, 2):
        mine = F.nearest_codes(got[f"rvq.layers.{i}"], states[i].codebook[0])[0]
        assert torch.equal(mine, indices[..., i].reshape(-1))
        assert indices[..., i].unique().numel() > 4  # a real comparison, not one code


def test_per_stage_projections_stop_the_chain_with_a_note():
    stages = [vq_state(torch.randn(8, 4), name=f"q.quantizers.{i}", group="q", stage=i,
                       project_in=(torch.randn(4, 12), None), input_dim=12) for i in range(3)]
    got = probe_inputs(torch.randn(5, 12, 7), stages, path="z.pt")
    assert set(got) == {"q.quantizers.0"}
    assert any("per-stage" in n or "own input projection" in n for n in stages[2].notes)
    assert not stages[0].notes


# -- metrics ---------------------------------------------------------------------------------


def test_assignment_on_a_tiny_codebook_euclidean_vs_cosine():
    cb = torch.tensor([[1.0, 0.0], [10.0, 10.0], [-1.0, 0.0], [0.0, -1.0]])
    z = torch.tensor([[2.0, 1.5], [2.0, 1.5], [-3.0, 0.1], [0.9, 0.0]])
    # euclidean: codes 0, 0, 2, 0 -> counts {0: 3, 2: 1}; cosine: 1, 1, 2, 0 -> {1: 2, 2: 1, 0: 1}
    eu = probe_metrics(vq_state(cb), z)
    assert eu["probe_usage_fraction"] == 0.5 and eu["probe_top1_share"] == 0.75
    assert eu["probe_perplexity"] == pytest.approx(math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25))))
    co = probe_metrics(vq_state(cb, metric="cosine"), z)
    assert co["probe_usage_fraction"] == 0.75 and co["probe_top1_share"] == 0.5
    assert co["probe_entropy_norm"] == pytest.approx(-(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)) / math.log(4))
    assert co["probe_dead_fraction"] == 0.25
    assert eu["nearest_dist_median"] > co["nearest_dist_median"]
    assert set(eu) <= set(PROBE) | set(CODEBOOK)


def test_scale_ratio_follows_the_probe_scale():
    q = vq_state(torch.randn(64, 8))
    z = torch.randn(500, 8)
    base, big = probe_metrics(q, z), probe_metrics(q, z * 1000)
    assert big["scale_ratio"] == pytest.approx(1000 * base["scale_ratio"], rel=1e-5)
    assert big["z_norm_median"] == pytest.approx(1000 * base["z_norm_median"], rel=1e-5)
    assert big["probe_usage_fraction"] < base["probe_usage_fraction"]  # far inputs pick the outermost codes
    assert big["quant_error_rel"] == pytest.approx(1.0, abs=0.01)
    assert big["nearest_to_intercode"] > 100


def test_nonfinite_probe_rows_are_counted_and_excluded():
    q = vq_state(torch.randn(16, 4))
    z = torch.randn(100, 4)
    clean = probe_metrics(q, z[2:])
    z[0, 1], z[1] = float("nan"), float("inf")
    m = probe_metrics(q, z)
    assert m["probe_nonfinite"] == 5.0 and m["probe_tokens"] == 98.0
    assert {**m, "probe_nonfinite": 0.0} == clean  # the rest is measured on the finite rows alone
    assert all(math.isfinite(v) for v in m.values())


def test_heads_share_or_split_codebooks():
    z = torch.randn(200, 8)
    shared = vq_state(torch.randn(1, 16, 4), input_heads=2)
    m = probe_metrics(shared, z)
    assert m["probe_tokens"] == 200.0
    sep = vq_state(torch.randn(2, 16, 4), input_heads=2)
    assert 0 < probe_metrics(sep, z)["probe_usage_fraction"] <= 1


def test_fsq_usage_matches_lucidrains_fsq():
    levels = [8, 5, 5, 5]
    fsq = vqp.FSQ(levels=levels).eval()
    z = torch.randn(4, 300, 4) * 1.5
    with torch.no_grad():
        _, idx = fsq(z)
    lv = F.fsq_level_indices(z.reshape(-1, 4), levels)
    assert torch.equal(F.fsq_indices(lv, levels), idx.reshape(-1).long())
    q = QuantizerState("fsq", "fsq", "vector-quantize-pytorch", math.prod(levels), 4, levels=tuple(levels))
    m = probe_metrics(q, z.reshape(-1, 4))
    assert set(m) <= set(PROBE)
    assert m["probe_usage_fraction"] == pytest.approx(idx.unique().numel() / 1000)
    assert m["fsq_level_usage_min"] == 1.0  # every level of every dimension is hit at this scale
    tiny = probe_metrics(q, z.reshape(-1, 4) * 1e-3)  # all values round to the middle level
    assert tiny["fsq_level_usage_min"] == pytest.approx(1 / 8) and tiny["fsq_saturation"] == 0.0
    huge = probe_metrics(q, z.reshape(-1, 4) * 1e3)
    assert huge["fsq_saturation"] == pytest.approx(1.0, abs=0.01)


def test_lfq_bits_match_lucidrains_lfq():
    lfq = vqp.LFQ(codebook_size=2 ** 6, dim=6).eval()
    z = torch.randn(2, 200, 6)
    z[..., 0] = z[..., 0].abs() + 0.1  # bit 0 always set: balance 0
    with torch.no_grad():
        _, idx, _ = lfq(z)
    assert torch.equal(F.lfq_indices(z.reshape(-1, 6))[1], idx.reshape(-1))
    q = QuantizerState("lfq", "lfq", "vector-quantize-pytorch", 64, 6)
    m = probe_metrics(q, z.reshape(-1, 6))
    assert set(m) <= set(PROBE)
    assert m["lfq_bit_balance_min"] == 0.0
    assert m["probe_usage_fraction"] == pytest.approx(idx.unique().numel() / 64)


def test_fsq_symmetric_levels_match_lucidrains():
    levels = [2, 4, 3]  # level 2 requires preserve_symmetry in lucidrains
    fsq = vqp.FSQ(levels=levels, preserve_symmetry=True).eval()
    z = torch.randn(2, 300, 3) * 1.5
    with torch.no_grad():
        _, idx = fsq(z)
    q = QuantizerState("fsq", "fsq", "vector-quantize-pytorch", 24, 3, levels=tuple(levels))
    lv = F.fsq_level_indices(z.reshape(-1, 3), levels, preserve_symmetry=True)
    assert torch.equal(F.fsq_indices(lv, levels), idx.reshape(-1).long())
    assert probe_metrics(q, z.reshape(-1, 3))["probe_usage_fraction"] == pytest.approx(idx.unique().numel() / 24)


def test_input_spread_separates_collapsed_from_informative_inputs():
    g = torch.Generator().manual_seed(11)
    cb = torch.randn(64, 8, generator=g)
    spread = torch.randn(4096, 8, generator=g)
    offset = 5.0 + 0.5 * torch.randn(4096, 8, generator=g)  # informative, far from the origin
    point = torch.full((4096, 8), 0.731) + 1e-7 * torch.randn(4096, 8, generator=g)  # saturated head
    m = {name: probe_metrics(vq_state(cb), z, projected=True)["z_spread"]
         for name, z in (("spread", spread), ("offset", offset), ("point", point))}
    assert m["spread"] > 0.9 and 0.05 < m["offset"] < 0.5 and m["point"] < 1e-5, m
    # scale-free: the unit is the inputs' own norm
    assert probe_metrics(vq_state(cb), 1e4 * spread, projected=True)["z_spread"] == pytest.approx(m["spread"])
    # all exactly 0: no spread at all
    assert probe_metrics(vq_state(cb), torch.zeros(100, 8), projected=True)["z_spread"] == 0.0
    # cosine quantizers compare directions: one direction at many lengths is collapsed
    lengths = torch.rand(4096, 1, generator=g) * 10 + 0.1
    one_dir = lengths * F.l2normalize(torch.randn(1, 8, generator=g))
    assert probe_metrics(vq_state(cb, metric="cosine"), one_dir, projected=True)["z_spread"] < 1e-6
    assert probe_metrics(vq_state(cb), one_dir, projected=True)["z_spread"] > 0.3


def test_probe_usage_expected_is_the_reachable_share():
    from vqdoctor.metrics.probe import reachable_share

    assert reachable_share(1000, 4000) == pytest.approx(1 - math.exp(-4), rel=1e-3)
    assert reachable_share(2 ** 16, 1000) == pytest.approx(1000 / 2 ** 16, rel=0.01)
    assert reachable_share(1, 5) == 1.0
    g = torch.Generator().manual_seed(12)
    cb = torch.randn(256, 4, generator=g)
    m = probe_metrics(vq_state(cb), cb[torch.randint(0, 256, (512,), generator=g)], projected=True)
    assert m["probe_usage_expected"] == pytest.approx(reachable_share(256, 512))
    assert m["probe_usage_fraction"] <= m["probe_usage_expected"] + 0.05
    assert set(m) <= set(PROBE) | set(CODEBOOK)


def test_gumbel_usage_follows_what_gumbel_softmax_picks():
    """taming GumbelQuantize picks argmax(gumbel_softmax(logits, hard=True)) in eval as well: a
    draw from softmax(logits), not its argmax. Logits that favour code 0 only slightly still use
    every code; peaked logits use the codes they point at."""
    g = torch.Generator().manual_seed(13)
    K, hid = 16, 8
    h = torch.randn(4096, hid, generator=g)
    w, b = torch.zeros(K, hid), torch.zeros(K)
    b[0] = 0.5  # code 0 is every input's argmax, but holds only ~1/10 of the probability mass
    st = QuantizerState("quantize", "gumbel", "taming-transformers", K, 4, codebook=torch.randn(1, K, 4),
                        input_dim=hid, extra={"gumbel_logits": (w, b)})
    m = probe_metrics(st, h, projected=True)
    assert m["probe_usage_fraction"] == 1.0 and m["probe_perplexity"] > 14
    assert m == probe_metrics(st, h, projected=True)  # seeded: repeatable
    peaked = torch.zeros(K, hid)
    peaked[:4] = 50 * torch.eye(4, hid)  # inputs pick one of 4 codes, near-deterministically
    st.extra["gumbel_logits"] = (peaked, torch.zeros(K))
    m = probe_metrics(st, h.abs(), projected=True)
    assert m["probe_usage_fraction"] == pytest.approx(4 / K) and "scale_ratio" not in m
