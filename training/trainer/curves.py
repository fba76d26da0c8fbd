"""Training metrics from the progress events: the reward/loss curve image and a final summary."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .progress import METRICS_FILE, parse_events

REWARD_COLOR = (30, 90, 200)
LOSS_COLOR = (200, 80, 30)


def run_events(run_dir: str | os.PathLike, launch_events: list[dict] | None = None) -> list[dict]:
    """Every event of the run in ``run_dir`` (its ``metrics.jsonl``), from the last fresh start
    (a ``started`` at step 0) on, so a resumed run's curve shows all its steps; ``launch_events``
    (this launch's stream) when the file is missing or unreadable."""
    try:
        events = parse_events((Path(run_dir) / METRICS_FILE).read_text(encoding="utf-8", errors="replace"))
    except OSError:
        events = []
    if not events:
        return list(launch_events or [])
    fresh = [i for i, e in enumerate(events) if e.get("event") == "started" and not e.get("step")]
    return events[fresh[-1]:] if fresh else events


def concat_phases(histories: list[list[dict]], max_steps: list[int]) -> list[dict]:
    """The events of consecutive phases (expert: both) as one run: each phase's steps after the
    steps of the phases before it."""
    out: list[dict] = []
    offset = 0
    for events, steps in zip(histories, max_steps):
        out += [dict(e, step=e["step"] + offset) if isinstance(e.get("step"), int) else e for e in events]
        offset += steps
    return out


def step_series(events: list[dict]) -> tuple[list[int], list[float], list[float]]:
    """(steps, rewards, losses) of the ``step`` events; a resumed run's repeated steps keep the last value."""
    by_step: dict[int, tuple[float, float]] = {}
    for e in events:
        if e.get("event") == "step" and e.get("reward") is not None:
            by_step[int(e["step"])] = (float(e["reward"]), float(e.get("loss", float("nan"))))
    steps = sorted(by_step)
    return steps, [by_step[s][0] for s in steps], [by_step[s][1] for s in steps]


def plot_training_curve(events: list[dict], width: int = 640, height: int = 320) -> torch.Tensor:
    """Reward (blue, left scale) and loss (orange, right scale) per step: IMAGE [1, H, W, 3] in [0, 1]."""
    from PIL import Image, ImageDraw

    steps, rewards, losses = step_series(events)
    image = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = 64, width - 64, 28, height - 30
    draw.rectangle((left, top, right, bottom), outline=(0, 0, 0))
    if not steps:
        draw.text((left + 10, (top + bottom) // 2), "no training step was recorded", fill=(0, 0, 0))
    else:
        first, last = steps[0], steps[-1]
        span = max(last - first, 1)

        def scale(values):
            finite = [v for v in values if v == v]
            low, high = (min(finite), max(finite)) if finite else (0.0, 1.0)
            if high - low < 1e-12:
                low, high = low - 0.5 * max(abs(low), 1e-3), high + 0.5 * max(abs(high), 1e-3)
            return low, high

        def xy(step, value, low, high):
            x = left + (step - first) / span * (right - left) if len(steps) > 1 else (left + right) / 2
            return x, bottom - (value - low) / (high - low) * (bottom - top)

        for values, color, axis_x, align in ((rewards, REWARD_COLOR, 4, "l"), (losses, LOSS_COLOR, right + 6, "r")):
            low, high = scale(values)
            for v in (low, (low + high) / 2, high):
                draw.text((axis_x, xy(first, v, low, high)[1] - 6), f"{v:.4g}", fill=color)
            points = [xy(s, v, low, high) for s, v in zip(steps, values) if v == v]
            if len(points) > 1:
                draw.line(points, fill=color, width=2)
            elif points:
                x, y = points[0]
                draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=color)
        for s in sorted({first, last, steps[len(steps) // 2]}):
            x = xy(s, 0, 0, 1)[0]
            draw.line((x, bottom, x, bottom + 4), fill=(0, 0, 0))
            draw.text((x - 6, bottom + 8), str(s), fill=(0, 0, 0))
    draw.text((left, 8), "reward", fill=REWARD_COLOR)
    draw.text((left + 60, 8), "loss", fill=LOSS_COLOR)
    draw.text((right - 40, 8), "step", fill=(0, 0, 0))
    data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).reshape(height, width, 3)
    return (data.float() / 255.0).unsqueeze(0)


def final_scores(events: list[dict]) -> dict:
    """Summary of a run: steps, first/last reward, last per-reward means and last validation."""
    steps, rewards, losses = step_series(events)
    last_step = next((e for e in reversed(events) if e.get("event") == "step"), {})
    validation = next((e for e in reversed(events) if e.get("event") == "validation"), None)
    finished = next((e for e in reversed(events) if e.get("event") == "finished"), {})
    k = max(1, len(rewards) // 5)
    summary = {
        "steps": steps[-1] if steps else 0,
        "reason": finished.get("reason"),
        "reward_first": sum(rewards[:k]) / k if rewards else None,
        "reward_last": sum(rewards[-k:]) / k if rewards else None,
        "loss_last": losses[-1] if losses else None,
        "rewards_last": last_step.get("rewards", {}),
        "lora_path": finished.get("lora_path"),
    }
    if validation:
        summary["validation"] = {"step": validation.get("step"), "rewards": validation.get("rewards"),
                                 "held_out": validation.get("held_out"), "motion": validation.get("motion")}
    warnings = [e.get("message") for e in events if e.get("event") == "warning"]
    if warnings:
        summary["warnings"] = warnings
    return summary


def final_scores_text(events: list[dict]) -> str:
    return json.dumps(final_scores(events), indent=1, default=str)
