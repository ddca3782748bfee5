"""Model resolution, loading and per-family adapters."""

from qtool.models.loading import load_model, load_tokenizer, resolve_model

__all__ = ["load_model", "load_tokenizer", "resolve_model"]
