"""Structural analysis: CKA and ridge statistics, the stage runner and its report."""
