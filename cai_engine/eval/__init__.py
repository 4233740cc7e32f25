"""Evaluations: `python -m cai_engine.eval mc` scores multiple-choice files by teacher forcing."""
