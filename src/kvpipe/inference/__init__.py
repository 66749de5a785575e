"""Giving a model its context KV (cache sources), conditions, and batched answering.

sources (ContextKV, CacheSource, OwnPrefill, GivenTensors, CACHE_SOURCES), conditions (Condition),
capture (query capture), prune (pruned caches in one batch), decode (greedy answering, stop ids),
session (Session: one model and prompt, answering any list of conditions as one batch).
"""
