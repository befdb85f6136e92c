"""Evaluation, merge sweeps, selection and reports (issue 6)."""
