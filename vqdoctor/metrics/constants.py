"""The numbers every measurement shares, in one place, so a checkpoint, a run and the gate agree.

Each is scale-free (a fraction of a uniform share, a ratio of medians) and carries its reason.
The host-side metrics (`metrics.usage`, `metrics.codebook`) and their sync-free device twins
(`metrics.device`) import them from here.
"""

from __future__ import annotations

# A code is dead when its count is below this fraction of a uniform share n/K. Relative, not
# absolute, because counts scale with tokens per step: EMA counts of a code unused for
# ln(0.01)/ln(γ) steps (459 at γ = 0.99, 21 at γ = 0.8), far below the replacement thresholds
# libraries use (lucidrains/encodec: 2 at n/K ≈ 4..32, i.e. 6..50%), so codes counted dead
# really stopped being selected; with hard counts over a window of >= MIN_HITS_PER_CODE x K
# vectors it is "never hit".
DEAD_REL = 0.01
# Absolute floor of EMA counts reported separately (`dead_fraction_abs`, common practice in
# codebook-utilisation logging).
DEAD_ABS = 1e-3
# Vectors per code a usage window must hold before "never hit" means "dead": ~4 expected hits
# under uniform usage, P(a live code is missed) ~ e^-4 ~ 2%.
MIN_HITS_PER_CODE = 4.0
# A row is blown up when its norm exceeds this x the reference (usage-weighted median) code norm:
# zero-initialised EMA counts inflate unused rows by γ/ε ≈ 1e5 after one step, while healthy
# codebooks rarely span more than 10x in norm.
BLOWUP_FACTOR = 100.0
# The reference norm is no reference for blow-ups when it is below this x the median of all
# non-zero rows: the codes in use sit at ~0 (an encoder output that is exactly 0 leaves the origin
# as the only live code), and every ordinary row would read as blown up by 1e10 or more.
NEAR_ZERO_REF = 1e-6
# A row below this x the reference norm has drifted to the origin (lucidrains <= 1.32 dead-code decay).
ZERO_REL = 1e-3
# An input component within this fraction of the largest |component| sits at the bound of its
# head (`z_saturated`): a tanh / sigmoid saturated by un-normalised inputs puts nearly all there.
SATURATION_REL = 0.99
