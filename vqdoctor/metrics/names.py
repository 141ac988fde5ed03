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
                         "reset_cluster_size = threshold; when unknown, an exact value v >= 1 shared by >= 5% but not all codes, "
                         "with no code below it, or with the codes below it on the decay ladder of deferred replacement: "
                         "v g, v g^2, v g^3 each shared by >= 2 codes, g from the most common value below v)",
    # geometry
    "nonfinite_rows_zero_count": "share of the non-finite codebook rows whose stored EMA count is exactly 0 (1: embed_avg "
                                 "divided by a zero count, no or underflowed Laplace smoothing)",
    "code_norm_median": "median L2 norm of code vectors (finite, non-zero rows; exact-zero rows are counted by zero_rows); "
                        "with EMA counts, each code weighted by min(count, n/K): the scale of the codes in use",
    "code_norm_min": "smallest code norm",
    "code_norm_max": "largest code norm",
    "blowup_rows": "rows with norm > blowup_factor (100) x code_norm_median (all heads pooled); run: x the "
                   "blowup_ratio reference, per cadence step",
    "blowup_ratio": "max / median code norm (absent when every row is zero, and, with blowup_rows, when "
                    "code_norm_median < 1e-6 x the median of all non-zero rows, i.e. the codes in use sit at ~0); "
                    "run: max / the larger of code_norm_median and z_norm_median (an EMA row averages inputs, so "
                    "codes that followed a growing encoder are not blown up)",
    "zero_rows": "rows with norm < 1e-3 x code_norm_median, or exactly 0 (collapsed to ~0)",
    "zero_row_fraction": "zero_rows / (H x K)",
    "duplicate_fraction": "fraction of codes with another code closer than 1e-2 x median inter-code distance, or identical "
                          "(within a deterministic sample of 4096 codes; cosine codebooks: on l2-normalised rows; "
                          "euclidean: over rows at the working scale, blown-up and ~0 rows excluded). With EMA counts "
                          "only a live code counts as the other code: duplicates among dead rows are dead codes, and "
                          "of a dead row on top of a live one the dead row is counted (dead rows: a sample of 512)",
    "intercode_dist_median": "median pairwise distance between codes (sampled above 4096 codes; cosine: l2-normalised rows; "
                             "with EMA counts, between live codes)",
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
    "probe_usage_expected": "share of K that probe_tokens uniform draws hit on average, 1 - (1 - 1/K)^n: the most a "
                            "probe of n vectors can show in use (0.98 at n = 4K; ~n/K for implicit FSQ/LFQ codebooks)",
    "probe_entropy_norm": "H / log K of the probe assignments",
    "probe_top1_share": "largest share of probe vectors assigned to one code",
    "z_norm_median": "median L2 norm of the (projected) quantizer inputs, per head slice of dim D",
    "z_saturated": "share of the quantizer's code-space input components within 1% of the largest |component| (at the bound "
                   "of a saturated tanh / sigmoid head: ~1; encoder outputs that carry information: ~0)",
    "z_spread": "median |z - mean z| / median |z| of the quantizer inputs (head slices; cosine: l2-normalised; "
                "Gumbel: the hidden features): ~0.3-1 for informative encoder outputs, ~0 when the encoder maps "
                "every input to one point (saturated sigmoid/tanh head); 0 when all inputs are exactly 0",
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
    "rows_unchanged_fraction": "fraction of codebook rows (finite in both) bit-identical between the first and the "
                               "last checkpoint; for a gradient-trained codebook, rows no gradient reached in between, "
                               "i.e. codes never selected (1 = frozen codebook)",
    "moved_rows_norm_ratio": "median norm of the rows that changed between the first and last checkpoint / median "
                             "norm of the rows that did not (last checkpoint); gradient codebooks: codes in use vs "
                             "codes still at their init (~1 healthy or plain dead codes; 20-200 measured when the "
                             "data sit far outside the init scale)",
    "counts_frozen": "1 when the EMA counts are bit-identical across checkpoints",
    "dead_fraction_first": "dead_fraction in the first checkpoint",
    "dead_fraction_delta": "dead_fraction last - first",
    "encoder_unchanged_fraction": "run-wide, from the first and last checkpoint: share of the encoder's weight elements "
                                  "(keys named enc*/quant_conv, else before the quantizer) in tensors bit-identical "
                                  "between them (first 65536 elements of each); 1 = the encoder got no update in "
                                  "between (metrics.params)",
    "decoder_unchanged_fraction": "the same for the decoder's weights (dec*/post_quant*, else after the quantizer)",
    "encoder_tensors": "encoder weight tensors compared",
    "encoder_norm_growth": "L2 norm of the encoder's weights in the last checkpoint / in the first (finite only)",
    "decoder_norm_growth": "the same for the decoder's weights",
    "decoder_tensors": "decoder weight tensors compared",
    "rank_codebook_max_diff": "max over ranks and codes of the row distance |e_rank_i - e_rank_0| / code_norm_median of rank 0",
}

RUN = {
    "tokens": "vectors quantized per step (all its training forwards)",
    "forwards": "training forwards of the quantizer in the step, when more than one (gradient accumulation)",
    "usage_window": "fraction of K hit in the last W steps",
    "window_tokens": "vectors quantized over the usage window (the n behind usage_window; < 4K cannot hit every code)",
    "entropy_norm_window": "H / log K of assignments over the last W steps",
    "ema_count_sum_to_tokens": "sum of EMA counts / tokens per training forward (per EMA update)",
    "codes_replaced": "codes replaced per step (dead-code revival); run: rows replaced in the cadence step's "
                      "training forward: moved by more than 0.5 x code_norm_median, or moved while their EMA count "
                      "rose above both its previous value and the step's hits (a reset, not an average)",
    "eval_mutation": "quantizer buffers changed by forwards in eval mode or under no_grad (count)",
    "nonfinite_input": "non-finite elements in quantizer inputs (per step)",
    "nonfinite_output": "non-finite elements in quantizer outputs",
    "nonfinite_grad": "non-finite gradients (run-wide: parameter tensors whose gradient holds NaN/Inf; per "
                      "quantizer: among the gradients at its output and input and of its codebook)",
    "nonfinite_buffers": "non-finite elements in quantizer buffers",
    "st_grad_ratio": "|grad at quantizer input| / |grad at quantizer output| (straight-through ~1); 0 when the "
                     "input does not require grad while an encoder that should learn sits before it",
    "st_grad_cos": "cosine between gradient at quantizer output and at its input",
    "st_grad_passthrough": "<grad at input, grad at output> / |grad at output|^2: the share of the output gradient "
                           "that comes out at the input (straight-through + commitment ~1; commitment only ~0)",
    "st_grad_task_ratio": "|grad at input minus its component along z - q (the commitment term's direction)| / "
                          "|grad at output|: ~1 plain straight-through, 0.2-1 rotation trick, 0 when only the "
                          "commitment term reaches the input (code-space quantizers only)",
    "st_code_space": "1 when the quantizer's input and output gradients are comparable (VQ / VQ-EMA module with no "
                     "projection or other learned map inside, not an earlier residual stage), else 0",
    "st_input_no_grad": "1 on cadence steps where the quantizer's input did not require grad while encoder "
                        "parameters in a stepping optimizer did (the encoder output was detached)",
    "st_output_no_grad": "1 on cadence steps where the quantizer's input required grad and its output did not (the "
                         "code returned without the straight-through z + (q - z).detach())",
    "codebook_forward_rms_change": "RMS element change of the codebook across one training forward (EMA update and "
                                   "replacement happen inside it; 0 for gradient-trained codebooks), cadence steps",
    "eval_codebook_rms_change": "RMS element change of the codebook per eval / no-grad forward that changed the "
                                "quantizer's buffers (mean over those forwards of the step)",
    "grad_norm_codebook": "gradient norm of codebook parameters",
    "grad_norm_encoder": "gradient norm of parameters before the quantizer (run-wide); 0 when those in a stepping "
                         "optimizer have no .grad while other parameters have one",
    "grad_norm_decoder": "gradient norm of parameters after the quantizer (run-wide; 0 as for the encoder)",
    "loss": "training loss (run-wide)",
    "perplexity_window": "exp(H) of assignments summed over the last W steps (reports: all ranks summed)",
    "window_steps": "W, the number of steps the *_window metrics (and run dead_fraction/usage_fraction) cover",
    "codebook_in_optimizer": "1 when the codebook Parameter (requires_grad) is in an optimizer that steps, 0 when "
                             "no stepping optimizer holds it (gradient-trained codebooks only)",
    "grad_norm_quantizer": "gradient norm of all quantizer parameters (codebooks and projections; run-wide)",
}

ALL = {**CODEBOOK, **PROBE, **DRIFT, **RUN}
