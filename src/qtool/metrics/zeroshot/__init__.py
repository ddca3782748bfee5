"""Internals of zero-shot evaluation: task files, prompts, loglikelihood scoring, metrics.

The public entry points live in qtool.metrics.tasks.
"""
