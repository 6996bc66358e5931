"""``python -m lorasave``."""

from lorasave.cli.main import run

run()
