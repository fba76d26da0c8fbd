"""Motion score: how much consecutive frames differ (image rewards tend to reduce motion)."""

from __future__ import annotations

import torch

from .preprocess import check_frames, rgb


def motion_score(frames: torch.Tensor) -> float:
    """Mean absolute difference of consecutive frames, x100 (0 = still; [T, 3, H, W] in [0, 1], alpha dropped).

    A single frame has no motion: 0.0.
    """
    check_frames(frames)
    if frames.shape[0] < 2:
        return 0.0
    with torch.no_grad():
        frames = rgb(frames.detach()).float()
        return float((frames[1:] - frames[:-1]).abs().mean()) * 100.0


def motion_per_step(frames: torch.Tensor) -> list[float]:
    """Per consecutive pair, the same measure as ``motion_score`` (length T-1)."""
    check_frames(frames)
    with torch.no_grad():
        frames = rgb(frames.detach()).float()
        return [float(v) * 100.0 for v in (frames[1:] - frames[:-1]).abs().flatten(1).mean(1)]


def motion_energy(frames: torch.Tensor) -> torch.Tensor:
    """Differentiable frame-difference energy per video: mean squared difference of consecutive
    frames, [B, F, 3, H, W] in [0, 1] -> [B] (the motion-preserving training term compares it)."""
    frames = frames.float()
    return (frames[:, 1:] - frames[:, :-1]).pow(2).flatten(1).mean(1)


def motion_hinge(frames: torch.Tensor, base_frames: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """mean_b max(0, 1 - E(frames_b) / E(base_b)): 0 while the video moves at least as much as the base
    model's video from the same noise, growing as its motion falls below it (no gradient to the base)."""
    ratio = motion_energy(frames) / motion_energy(base_frames.detach()).clamp_min(eps)
    return torch.relu(1.0 - ratio).mean()
