"""Evaluation commands on trained runs: `python -m raven_titan.eval.validate` (per-depth held-out loss)."""
