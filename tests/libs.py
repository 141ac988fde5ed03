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
