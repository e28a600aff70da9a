"""Column names of every result table, named once here and used by writers, readers and tests."""

PERPLEXITY = ("model", "method", "target_sparsity", "achieved_sparsity", "skipped_ffn_params", "ppl", "word_ppl", "tokens")
DOWNSTREAM = ("model", "method", "target_sparsity", "task", "acc", "acc_norm", "n", "achieved_sparsity", "skipped_ffn_params")
AVERAGE_TASK = "average"  # the task label of the 8-task mean row of each (model, method, sparsity)
