"""``python -m lorasave``."""

from .cli import run

run()
