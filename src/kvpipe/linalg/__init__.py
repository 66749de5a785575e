"""Streamed linear statistics every analysis stage may use: ridge maps and CCA from sufficient statistics."""
