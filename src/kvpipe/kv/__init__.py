"""Per-model KV extraction, the sharded Parquet KV store and numerics checks."""
