"""Across the pairs of a run."""
