"""A test plug-in reward: 0.5 for every branch of prompts on a black background (a group without reward
variance, which skips its replay), else the video's mean brightness."""

import torch


def make():
    def score(videos, prompts):
        bright = videos.float().flatten(1).mean(1)
        flat = [0.5 if "black background" in p else float(b) for p, b in zip(prompts, bright, strict=True)]
        return torch.tensor(flat)

    return score
