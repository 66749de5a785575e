"""Model sources, materialisation to safetensors, loading, RoPE tables and tiny test models."""
