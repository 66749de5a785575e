"""Token scoring and selection, shared by the analysis stages: methods (registry), budget and top-k (select)."""
