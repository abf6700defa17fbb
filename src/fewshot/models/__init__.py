"""Backbones: the networks that algorithms adapt (MAML) or use as embeddings (metric methods)."""
