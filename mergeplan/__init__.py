"""mergeplan: plan, review and apply reproducible merges of fine-tuned LLMs."""

__version__ = "0.2.0"
