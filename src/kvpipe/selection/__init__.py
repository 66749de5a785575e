"""Selection transfer: token-selection methods, the stage runner and its report."""
