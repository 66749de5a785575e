"""Datasets (SQuAD v2, synthetic), seeded sampling, chat prompts and QA scoring."""
