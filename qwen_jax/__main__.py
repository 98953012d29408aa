"""``python -m qwen_jax ...``: the ``qwen-jax`` command line."""

import sys

from qwen_jax.cli import main

sys.exit(main())
