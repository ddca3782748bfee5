"""Model evaluation: zero-shot task accuracy (tasks.py)."""
