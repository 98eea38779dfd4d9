"""``python -m probprune``: the probprune-fast command line (``torchrun ... -m probprune prune``)."""
import sys

from .cli import main

sys.exit(main())
