"""Giving a model its context KV (cache sources), conditions, and batched answering."""
