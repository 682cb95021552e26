"""``python -m deepreglib ...`` is the worker entry point (same as the ``deepreg`` command)."""
import sys

from .cli import main

sys.exit(main())
