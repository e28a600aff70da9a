"""actsparse: calibrate and evaluate training-free activation sparsity in LLMs."""

__version__ = "0.1.0"
