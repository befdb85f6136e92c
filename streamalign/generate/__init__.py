"""Text to video with base / adapter / merged weights: batches, long videos, multi-scene prompts."""
