"""Objectives (CoPO, NFT, SDE-GRPO), training loops, LoRA and checkpoints (issues 5, 7)."""
