"""Column names of every result table, named once here and used by writers, readers and tests."""

DENSE = "dense"  # the method label of the dense baseline (at sparsity 0.00) in every table and path

PERPLEXITY = ("model", "method", "target_sparsity", "achieved_sparsity", "skipped_ffn_params", "ppl", "word_ppl", "tokens")
DOWNSTREAM = ("model", "method", "target_sparsity", "task", "acc", "acc_stderr", "acc_norm", "n", "achieved_sparsity",
              "skipped_ffn_params")
AVERAGE_TASK = "average"  # the task label of the 8-task mean row of each (model, method, sparsity)
# per (layer, component) sparsity a ppl result records (its layer_sparsity), one row each
LAYER_SPARSITY = ("model", "method", "target_sparsity", "layer", "component", "achieved_sparsity")
ACC_STDERR = "acc_stderr"  # lm-eval's standard error of acc: sqrt(var(ddof=1) / n) over the documents
# bound: the weight-bytes bound at the active fraction; tokens_matched of tokens_checked: greedy
# tokens equal to the masked dense model's, up to where they first part; forced_tokens_matched: of
# them, the sparse model's choices equal to the masked model's after the same tokens (fed its tokens);
# max_module_diff: the kernels against it (kernels.Agreement);
# kernel_dense_tps, kernel_speedup: the sparse kernels keeping every channel, and the speedup over them;
# native_dense_tps, native_speedup: the dense model on the kernels' engine; fair_speedup: over the
# fastest of the three dense steps, the smallest speedup; native_dense_gbps: the native dense step's
# weight bytes over its time, low in spells of outside load (kernels.decode_speed);
# compiled_dense_tps, compiled_sparse_tps, compiled_speedup, compiled_dense_gbps: the decoder layers
# as one C call each (the faster of its dense steps, its sparse step, the ratio, the dense step's
# weight bytes over its time), NaN where the family has none; compiled_logit_diff: its sparse
# logits against PyTorch's masked alike, of their scale (compiled_step)
SPEED = ("model", "method", "sparsity", "device", "dense_tps", "sparse_tps", "speedup", "bound", "active_fraction",
         "tokens_matched", "tokens_checked", "max_module_diff", "kernel_dense_tps", "kernel_speedup", "native_dense_tps",
         "native_speedup", "fair_speedup", "native_dense_gbps", "forced_tokens_matched",
         "compiled_dense_tps", "compiled_sparse_tps", "compiled_speedup", "compiled_dense_gbps", "compiled_logit_diff")
# the paper layouts (actsparse.publish); their value columns follow the data (sparsity levels, tasks)
MODELS = ("model", "family", "activation", "parameters", "layers", "ffn_share")  # the seed paper's Table I
PERPLEXITY_WIDE_KEYS = ("model", "method")  # then one ppl column per target sparsity, two decimals
DOWNSTREAM_WIDE_KEYS = ("model", "method", "target_sparsity")  # then acc per task and the average
ACTIVATED_FFN_PARAMS = "activated_ffn_params"  # 1 - skipped_ffn_params: the FFN weight work still done
AVERAGE_STDERR = "average_stderr"  # the wide layout's acc_stderr of the task average
# perplexity interpolated at equal skipped FFN weight work (actsparse.tables.perplexity_at_budget)
PERPLEXITY_AT_BUDGET = ("model", "method", "skipped_ffn_params", ACTIVATED_FFN_PARAMS, "ppl")
BUDGETS = (0.3, 0.4, 0.5)  # skipped_ffn_params at which every method's perplexity is compared
PROVENANCE = ("file", "config_hash", "code_version", "device", "seed", "python", "packages")
# row identities of the pattern tables (also their row order); similarity sorts high to low, as in the paper
MATCH_KEYS = ("model", "strategy", "sample", "similarity", "layer", "metric")
PREDICTOR_KEYS = ("model", "features", "target_layer")
PREFETCH_KEYS = ("model", "features", "layer", "budget_fraction")
LATENCY_KEYS = ("model", "hardware", "features", "budget_fraction")
TABLE_II_KEYS = ("model", "strategy", "metric", "layer", "sample")

# What identifies a row of each table of results/tables/ (`actsparse compare` pairs the rows of two
# runs on them); every other column is a measurement. Sparsity levels are keys, not measurements.
TABLE_KEYS: dict[str, tuple[str, ...]] = {
    "models": MODELS[:1],
    "perplexity": PERPLEXITY[:3],
    "perplexity_wide": PERPLEXITY_WIDE_KEYS,
    "perplexity_at_budget": PERPLEXITY_AT_BUDGET[:3],
    "downstream": DOWNSTREAM[:4],
    "downstream_wide": DOWNSTREAM_WIDE_KEYS,
    "layer_sparsity": LAYER_SPARSITY[:5],
    "weights": ("model", "matrix", "bin_low", "bin_high"),
    "weight_zeros": ("model", "matrix"),
    "natural_sparsity": ("model", "layer", "component"),
    "activation_cdf": ("model", "layer", "component", "abs_value"),
    "pattern_match": MATCH_KEYS,
    "pattern_match_table_ii": TABLE_II_KEYS,
    "predictor": PREDICTOR_KEYS,
    "prefetch": PREFETCH_KEYS,
    "latency": LATENCY_KEYS,
    "speed": SPEED[:4],
    "provenance": PROVENANCE[:1],
}
# key columns holding a sparsity level: compared as its two-decimal label (`0.50`, as in paths)
SPARSITY_LEVELS = ("target_sparsity", "sparsity")
