"""Evaluation: perplexity, memory accounting, reports."""
