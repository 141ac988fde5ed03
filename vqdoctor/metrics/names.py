"""The metric vocabulary: the one contract between measurement (metrics, watch) and judgement (rules).

Every scalar a rule may read is named here. Checkpoint metrics are computed from the normal form
(`metrics.codebook`), probe metrics from encoder outputs (`metrics.probe`), drift metrics from
several checkpoints (`metrics.drift`); run metrics per step by `watch`. A name means the same
thing in every mode, so a rule written for a checkpoint also works on a run's latest values.
Fractions are in [0, 1]; "expected count" is n/K (tokens per step over codebook size).
"""

from __future__ import annotations

CODEBOOK = {
    "codebook_size": "K, the number of codes (implicit for FSQ/LFQ: product of levels / 2^bits)",
    "fsq_levels_min": "FSQ: fewest levels in one dimension (from config or the user)",
    # EMA counts (vq-ema only; aggregated over heads by mean)
    "count_total": "sum of EMA counts (cluster_size); ~tokens per step (x ranks) at steady state",
    "count_expected": "count_total / K: the count of a code in a uniform usage",
    "dead_fraction": "fraction of codes whose count < dead_rel (0.01) x count_expected",
    "dead_fraction_abs": "fraction of codes whose count < 1e-3 (absolute)",
    "usage_fraction": "1 - dead_fraction (checkpoint); fraction of K hit over the window (run)",
    "entropy_norm": "H(p) / log K of the usage distribution p",
    "perplexity": "exp(H(p)); checkpoint: of EMA counts; run: of the batch assignments",
    "perplexity_fraction": "perplexity / K",
    "top1_share": "largest share of assignments held by one code",
    "replaced_fraction": "fraction of codes whose count equals the replacement reset value (lucidrains resets to exactly "
                         "reset_cluster_size = threshold; when unknown, an exact value >= 1 shared by >= 5% but not all codes, "
                         "with no code below it)",
    # geometry
    "code_norm_median": "median L2 norm of code vectors (finite, non-zero rows; exact-zero rows are counted by zero_rows); "
                        "with EMA counts, each code weighted by min(count, n/K): the scale of the codes in use",
    "code_norm_min": "smallest code norm",
    "code_norm_max": "largest code norm",
    "blowup_rows": "rows with norm > blowup_factor (100) x code_norm_median (all heads pooled)",
    "blowup_ratio": "max / median code norm (absent when every row is zero)",
    "zero_rows": "rows with norm < 1e-3 x code_norm_median, or exactly 0 (collapsed to ~0)",
    "zero_row_fraction": "zero_rows / (H x K)",
    "duplicate_fraction": "fraction of codes with another code closer than 1e-2 x median inter-code distance, or identical "
                          "(within a deterministic sample of 4096 codes; cosine codebooks: on l2-normalised rows; "
                          "euclidean: over rows at the working scale, blown-up and ~0 rows excluded)",
    "intercode_dist_median": "median pairwise distance between codes (sampled above 4096 codes; cosine: l2-normalised rows)",
    "effective_rank": "exp(entropy of normalised singular values) of the centred codebook",
    "effective_rank_fraction": "effective_rank / min(K, D)",
    # finiteness and storage
    "nonfinite_codebook": "non-finite elements in the codebook",
    "nonfinite_rows": "codebook rows holding any non-finite element",
    "nonfinite_cluster_size": "non-finite elements in the EMA counts",
    "nonfinite_embed_avg": "non-finite elements in the EMA sums",
    "nonfinite_total": "sum of the nonfinite_* counts",
    "ema_lowp": "1 when EMA buffers are stored in float16/bfloat16, else 0",
    "initted": "1/0: the library's initialisation flag (k-means / data init done)",
    # EMA invariant embed ~ embed_avg / smoothed(cluster_size)
    "ema_residual_median": "median over rows of |e - m/N~| / |e|",
    "ema_residual_max": "max over live (not dead) rows of |e - m/N~| / |e|",
    # optimizer state (when the checkpoint carries Adam moments for the codebook)
    "optim_rows_no_grad_fraction": "fraction of codebook rows whose exp_avg_sq is exactly 0 (never got gradient)",
    # dead-code replacement config (rules: replacement-churn), when the threshold is known
    "replace_threshold_to_expected": "dead-code replacement threshold (e.g. lucidrains threshold_ema_dead_code, "
                                     "the reset value) / count_expected; >= 1 resets codes at uniform usage",
}

PROBE = {
    "probe_tokens": "number of finite probe vectors used (rows before the split into heads)",
    "probe_perplexity": "perplexity of nearest-code assignments of the probe",
    "probe_usage_fraction": "fraction of K hit by the probe",
    "probe_dead_fraction": "1 - probe_usage_fraction",
    "probe_entropy_norm": "H / log K of the probe assignments",
    "probe_top1_share": "largest share of probe vectors assigned to one code",
    "z_norm_median": "median L2 norm of the (projected) quantizer inputs, per head slice of dim D",
    "scale_ratio": "z_norm_median / code_norm_median",
    "nearest_dist_median": "median distance from an input to its nearest code (cosine: between l2-normalised vectors)",
    "nearest_to_intercode": "nearest_dist_median / intercode_dist_median",
    "quant_error_rel": "median |z - e_k| / |z| (cosine: on l2-normalised vectors)",
    "probe_nonfinite": "non-finite elements in the probe",
    "fsq_level_usage_min": "FSQ: smallest fraction of levels used in one dimension",
    "fsq_saturation": "FSQ: fraction of values on the outermost levels",
    "lfq_bit_balance_min": "LFQ: min over bits of 2 x min(p, 1 - p)",
}

DRIFT = {
    "drift_checkpoints": "number of checkpoints compared",
    "codebook_rms_change": "RMS element change of the codebook, first to last checkpoint (run: per step)",
    "codebook_rel_change": "|e_last - e_first|_F / |e_first|_F",
    "codebook_frozen": "1 when the codebook is bit-identical across checkpoints",
    "counts_frozen": "1 when the EMA counts are bit-identical across checkpoints",
    "dead_fraction_first": "dead_fraction in the first checkpoint",
    "dead_fraction_delta": "dead_fraction last - first",
    "rank_codebook_max_diff": "max over ranks and codes of the row distance |e_rank_i - e_rank_0| / code_norm_median of rank 0",
}

RUN = {
    "tokens": "vectors quantized per step",
    "usage_window": "fraction of K hit in the last W steps",
    "window_tokens": "vectors quantized over the usage window (the n behind usage_window; < 4K cannot hit every code)",
    "entropy_norm_window": "H / log K of assignments over the last W steps",
    "ema_count_sum_to_tokens": "sum of EMA counts / tokens per step",
    "codes_replaced": "codes replaced per step (dead-code revival); run: codebook rows that jumped by more than "
                      "0.5 x code_norm_median between two cadence snapshots, divided by the steps between them",
    "eval_mutation": "quantizer buffers changed by forwards in eval mode or under no_grad (count)",
    "nonfinite_input": "non-finite elements in quantizer inputs (per step)",
    "nonfinite_output": "non-finite elements in quantizer outputs",
    "nonfinite_grad": "non-finite gradients (run-wide: parameter tensors whose gradient holds NaN/Inf; per "
                      "quantizer: among the gradients at its output and input and of its codebook)",
    "nonfinite_buffers": "non-finite elements in quantizer buffers",
    "st_grad_ratio": "|grad at quantizer input| / |grad at quantizer output| (straight-through ~1)",
    "st_grad_cos": "cosine between gradient at quantizer output and at its input",
    "grad_norm_codebook": "gradient norm of codebook parameters",
    "grad_norm_encoder": "gradient norm of parameters before the quantizer (run-wide)",
    "grad_norm_decoder": "gradient norm of parameters after the quantizer (run-wide)",
    "loss": "training loss (run-wide)",
    "perplexity_window": "exp(H) of assignments summed over the last W steps (reports: all ranks summed)",
    "window_steps": "W, the number of steps the *_window metrics (and run dead_fraction/usage_fraction) cover",
    "codebook_in_optimizer": "1 when the codebook Parameter (requires_grad) is in an optimizer that steps, 0 when "
                             "no stepping optimizer holds it (gradient-trained codebooks only)",
    "grad_norm_quantizer": "gradient norm of all quantizer parameters (codebooks and projections; run-wide)",
}

ALL = {**CODEBOOK, **PROBE, **DRIFT, **RUN}
