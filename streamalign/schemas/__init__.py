"""Validated configuration models."""
