"""``python -m bench`` from the checkout's root: see bench/harness/cli.py."""
import sys

from bench.harness.cli import main

sys.exit(main())
