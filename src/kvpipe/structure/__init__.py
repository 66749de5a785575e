"""Structural analysis: CKA, the stage runner (ridge and CCA from kvpipe.linalg) and its report."""
