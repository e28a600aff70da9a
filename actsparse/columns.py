"""Column names of every result table, named once here and used by writers, readers and tests."""

PERPLEXITY = ("model", "method", "target_sparsity", "achieved_sparsity", "skipped_ffn_params", "ppl", "word_ppl", "tokens")
DOWNSTREAM = ("model", "method", "target_sparsity", "task", "acc", "acc_norm", "n", "achieved_sparsity", "skipped_ffn_params")
AVERAGE_TASK = "average"  # the task label of the 8-task mean row of each (model, method, sparsity)
SPEED = ("model", "method", "sparsity", "device", "dense_tps", "sparse_tps", "speedup")
# the paper layouts (actsparse.publish); their value columns follow the data (sparsity levels, tasks)
MODELS = ("model", "family", "activation", "parameters", "layers", "ffn_share")  # the seed paper's Table I
PERPLEXITY_WIDE_KEYS = ("model", "method")  # then one ppl column per target sparsity, two decimals
DOWNSTREAM_WIDE_KEYS = ("model", "method", "target_sparsity")  # then acc per task and the average
ACTIVATED_FFN_PARAMS = "activated_ffn_params"  # 1 - skipped_ffn_params: the FFN weight work still done
PROVENANCE = ("file", "config_hash", "code_version", "device", "seed", "python", "packages")
