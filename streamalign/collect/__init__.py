"""Rollout of fork groups, scoring and writing buffer entries (issue 4)."""
