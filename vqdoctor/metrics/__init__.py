"""Measurements: pure functions over the normal form and probe tensors, plus device accumulators."""
