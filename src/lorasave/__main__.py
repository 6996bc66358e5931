"""``python -m lorasave``."""

from .cli import main

main()
