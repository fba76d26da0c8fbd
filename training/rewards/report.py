"""Frame selection, batched no-grad scoring, best-of-N picking and a score plot (PIL, no matplotlib).

What the ComfyUI nodes call; kept here so it runs and is tested without ComfyUI.
"""

from __future__ import annotations

import json
import math

import numpy as np
import torch

from .base import RewardModel
from .motion import motion_per_step, motion_score

FRAME_SELECTIONS = ("all", "first", "every_nth", "evenly_spaced")


def select_frames(count: int, selection: str, n: int = 1) -> list[int]:
    """Indices of the frames to score: all, first, every Nth (0, N, 2N, ...), or N evenly spaced."""
    if count <= 0:
        raise ValueError("no frames to score (the IMAGE batch is empty)")
    if selection == "all":
        return list(range(count))
    if selection == "first":
        return [0]
    if n < 1:
        raise ValueError(f"n must be >= 1 for frame selection {selection!r}, got {n}")
    if selection == "every_nth":
        return list(range(0, count, n))
    if selection == "evenly_spaced":
        if n == 1:
            return [0]
        n = min(n, count)
        return sorted({round(i * (count - 1) / (n - 1)) for i in range(n)})
    raise ValueError(f"frame selection must be one of {FRAME_SELECTIONS}, got {selection!r}")


def split_videos(frames: torch.Tensor, frames_per_video: int, name: str = "images") -> list[torch.Tensor]:
    """A batch of N videos of ``frames_per_video`` frames each, in batch order (video-major, as a
    VAE decode of a latent batch of N gives them); 0 = one video. ValueError naming ``name``."""
    if frames_per_video <= 0:
        return [frames]
    count = frames.shape[0]
    if count % frames_per_video:
        raise ValueError(f"{name} has {count} frames, not a whole number of videos of frames_per_video = "
                         f"{frames_per_video} frames; set frames_per_video to the frames of one video (the length "
                         "of the latent video, e.g. 81), or 0 for a single video")
    return list(frames.split(frames_per_video))


def video_summary(reports: list[dict]) -> dict:
    """Per-video means and the best video of one model's reports (one per video of a batch)."""
    means = [r["mean"] for r in reports]
    best = int(np.argmax(means))
    return {"video_means": means, "best_video": best, "best_video_mean": means[best], "mean": float(np.mean(means))}


def score_frames(model: RewardModel, frames: torch.Tensor, prompt: str, batch_size: int = 8,
                 preprocess: str | None = None) -> list[float]:
    """Scores of each frame [T, 3, H, W] against one prompt, in chunks, without gradients."""
    scores = []
    with torch.no_grad():
        for start in range(0, frames.shape[0], max(1, batch_size)):
            chunk = frames[start:start + batch_size]
            scores.extend(model.score(chunk, [prompt] * chunk.shape[0], preprocess=preprocess).tolist())
    return scores


def score_report(model: RewardModel, frames: torch.Tensor, prompt: str, selection: str = "all", n: int = 4,
                 batch_size: int = 8, preprocess: str | None = None) -> dict:
    """Scores of the selected frames, their mean, and the motion of the whole clip (its mean and
    per consecutive pair: ``motion_per_step[i]`` is frames i -> i+1)."""
    indices = select_frames(frames.shape[0], selection, n)
    scores = score_frames(model, frames[indices], prompt, batch_size, preprocess)
    return {
        "model": model.name, "variant": getattr(model, "variant", None),
        "preprocess": preprocess or model.preprocess, "prompt": prompt,
        "frames": indices, "scores": scores, "mean": float(np.mean(scores)),
        "motion": motion_score(frames), "motion_per_step": motion_per_step(frames),
        "frame_count": int(frames.shape[0]),
    }


def report_text(report: dict) -> str:
    scores = report["scores"]
    return (f"{report['model']}: mean {report['mean']:.4f} over {len(scores)} of {report['frame_count']} frames "
            f"(min {min(scores):.4f}, max {max(scores):.4f}); motion {report['motion']:.2f}\n"
            + ", ".join(f"#{i}: {s:.4f}" for i, s in zip(report["frames"], scores)))


def report_json(report: dict) -> str:
    return json.dumps(report, indent=1)


def pick_best(reports: list[dict], top_k: int = 1, threshold: float = -math.inf,
              indices: list[int] | None = None) -> dict:
    """Rank candidates by mean score. Every index is 0-based: ``indices[i]`` names report i
    (default ``i``; the node passes N-1 for its input ``candidate_N``).

    ``kept``: the best ``top_k`` whose mean is at least ``threshold`` (may be empty).
    ``top_k``: ``kept``, or the best alone when none reaches the threshold (``threshold_met``
    False), so it is never empty. ``rejected``: the ranking without ``top_k`` (may be empty).
    """
    if not reports:
        raise ValueError("no candidates to pick from")
    names = list(range(len(reports))) if indices is None else list(indices)
    if len(names) != len(reports):
        raise ValueError(f"{len(names)} indices for {len(reports)} candidates")
    order = sorted(range(len(reports)), key=lambda i: reports[i]["mean"], reverse=True)
    kept = [i for i in order[:max(1, top_k)] if reports[i]["mean"] >= threshold]
    top = kept or order[:1]
    return {"best": names[order[0]], "best_score": reports[order[0]]["mean"], "ranking": [names[i] for i in order],
            "kept": [names[i] for i in kept], "top_k": [names[i] for i in top], "threshold_met": bool(kept),
            "rejected": [names[i] for i in order if i not in top]}


def pick_text(pick: dict, reports: list[dict], indices: list[int] | None = None) -> str:
    """The ranking as text, with 0-based indices (index i is the node's input candidate_{i+1})."""
    names = list(range(len(reports))) if indices is None else list(indices)
    by_index = dict(zip(names, reports))
    lines = [f"best: index {pick['best']} ({pick['best_score']:.4f}); top_k {pick['top_k']}"
             + ("" if pick["threshold_met"] else " (no candidate reaches the threshold: the best alone)")]
    for rank, index in enumerate(pick["ranking"], 1):
        report = by_index[index]
        lines.append(f"{rank}. index {index}: {report['model']} {report['mean']:.4f}, motion {report['motion']:.2f}")
    return "\n".join(lines)


def plot_scores(report: dict | list[dict], width: int = 512, height: int = 288) -> torch.Tensor:
    """Line plot of score per frame (mean line, motion in the title), one panel per report:
    [1, height * panels, width, 3] in [0, 1]."""
    from PIL import Image

    reports = report if isinstance(report, list) else [report]
    panels = [_plot_panel(r, width, height) for r in reports]
    image = Image.new("RGB", (width, height * len(panels)), (255, 255, 255))
    for index, panel in enumerate(panels):
        image.paste(panel, (0, index * height))
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).unsqueeze(0)


def combine_reports(reports: list[dict], weights: list[float]) -> dict:
    """Weighted sum of several models' reports on the same frames (as the trainer combines rewards)."""
    scores = [sum(w * r["scores"][i] for r, w in zip(reports, weights)) for i in range(len(reports[0]["scores"]))]
    return {**reports[0], "model": "+".join(f"{w:g}*{r['model']}" for r, w in zip(reports, weights)),
            "scores": scores, "mean": float(np.mean(scores)), "weights": list(weights), "models": reports}


def _plot_panel(report: dict, width: int, height: int):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = 64, width - 16, 32, height - 32
    xs, ys = report["frames"], report["scores"]
    low, high = min(ys), max(ys)
    if high - low < 1e-9:
        low, high = low - 0.5 * max(abs(low), 1e-3), high + 0.5 * max(abs(high), 1e-3)
    span_x = max(xs[-1] - xs[0], 1)

    def point(x, y):
        return (left + (x - xs[0]) / span_x * (right - left) if len(xs) > 1 else (left + right) / 2,
                bottom - (y - low) / (high - low) * (bottom - top))

    draw.rectangle((left, top, right, bottom), outline=(0, 0, 0))
    for value in (low, (low + high) / 2, high):
        y = point(xs[0], value)[1]
        draw.line((left - 4, y, left, y), fill=(0, 0, 0))
        draw.text((4, y - 6), f"{value:.4g}", fill=(0, 0, 0))
    for x in sorted({xs[0], xs[-1], xs[len(xs) // 2]}):
        px = point(x, low)[0]
        draw.line((px, bottom, px, bottom + 4), fill=(0, 0, 0))
        draw.text((px - 6, bottom + 6), str(x), fill=(0, 0, 0))
    mean_y = point(xs[0], report["mean"])[1]
    draw.line((left, mean_y, right, mean_y), fill=(200, 120, 0))
    points = [point(x, y) for x, y in zip(xs, ys)]
    if len(points) > 1:
        draw.line(points, fill=(30, 90, 200), width=2)
    for px, py in points:
        draw.ellipse((px - 3, py - 3, px + 3, py + 3), fill=(30, 90, 200))
    draw.text((left, 8), f"{report['model']} per frame  mean {report['mean']:.4f}  motion {report['motion']:.2f}",
              fill=(0, 0, 0))
    draw.text((left + 16, bottom + 6), "frame", fill=(120, 120, 120))
    return image
