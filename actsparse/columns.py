"""Column names of every result table, named once here and used by writers, readers and tests."""

PERPLEXITY = ("model", "method", "target_sparsity", "achieved_sparsity", "skipped_ffn_params", "ppl", "word_ppl", "tokens")
