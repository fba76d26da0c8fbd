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
