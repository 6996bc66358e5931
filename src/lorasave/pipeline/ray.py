"""Run batch passes as Ray tasks (``lorasave batch JOBS --ray [ADDRESS]``); filled in below."""
