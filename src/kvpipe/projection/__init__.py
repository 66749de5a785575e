"""The projection stage: scout->main KV projectors, injection into the main model, bytes and time to first token."""
