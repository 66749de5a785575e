"""kvpipe: measure how one LLM's KV cache relates to another's."""

__version__ = "0.1.0"
