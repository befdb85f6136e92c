"""A test plug-in reward: NaN for every branch of prompts that mention red, else 0.5 (collect must reject)."""

import torch


def make():
    def score(videos, prompts):
        return torch.tensor([float("nan") if "red" in p else 0.5 for p in prompts])

    return score
