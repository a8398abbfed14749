"""Prompts, reference images (generation, loading, validation) and the CLIP embedding cache."""
