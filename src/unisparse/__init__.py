"""unisparse: sparsity in unified multimodal models, as a library and a reproducible pipeline."""

__version__ = "0.1.0"
