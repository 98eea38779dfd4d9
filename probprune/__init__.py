"""probprune: post-training structural pruning of LLaMA-family models by policy gradient."""
__version__ = "0.1.0"
