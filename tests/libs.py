"""Imports of the real VQ libraries used by tests, with the quirks of this environment handled."""

from __future__ import annotations

import sys
import types

import pytest


def encodec_core_vq():
    """encodec's `core_vq` module, imported without torchaudio (which does not load beside this torch).

    encodec's package __init__ imports torchaudio for audio utilities the quantizer never uses,
    so a placeholder module stands in during the import and is removed right after.
    """
    if "encodec.quantization.core_vq" in sys.modules:
        return sys.modules["encodec.quantization.core_vq"]
    placeholder = "torchaudio" not in sys.modules
    if placeholder:
        sys.modules["torchaudio"] = types.ModuleType("torchaudio")
    try:
        try:
            from encodec.quantization import core_vq
        except ImportError as e:  # encodec not installed: see README (pip install --no-deps encodec)
            pytest.skip(f"encodec not importable: {e}")
    finally:
        if placeholder:
            sys.modules.pop("torchaudio", None)
    return core_vq


def lucidrains_version() -> tuple[int, ...]:
    """The installed vector-quantize-pytorch release as a tuple ((0,) when it is not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return tuple(int(p) for p in version("vector-quantize-pytorch").split(".")[:3] if p.isdigit())
    except PackageNotFoundError:
        return (0,)


# vector-quantize-pytorch >= 1.34: EMA statistics start at zero, the codebook is
# (embed_avg + eps * embed) / (cluster_size + eps) (no Laplace smoothing), dead codes are those
# below `dead_code_threshold_ratio` x the mean count and are reset to a ratio of it, and k-means
# init writes only `embed`. Tests whose expected numbers follow from that arithmetic branch on it.
LUCIDRAINS_ZERO_INIT = lucidrains_version() >= (1, 33)
