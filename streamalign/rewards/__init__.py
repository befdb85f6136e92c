"""Reward registry, weighting, built-in rewards and adapters for external reward models (issue 3)."""
