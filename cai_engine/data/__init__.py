"""Data formats: comparisons for the preference model (and, next, prompts and chat formatting)."""
