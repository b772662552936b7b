"""Supervised classification: ``tvlars train``."""
