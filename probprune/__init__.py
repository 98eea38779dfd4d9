"""probprune: post-training structural pruning of LLaMA-family models by policy gradient."""
__version__ = "0.1.0"

from .models import load_pruned  # noqa: E402,F401  (a pruned directory reloads in one call)
from .api import PruneResult, prune  # noqa: E402,F401  (prune a model you hold, from Python)
