"""The trainer run in-process on one thread, for tests that look at its events."""

from __future__ import annotations

import io
from pathlib import Path

import torch

from training.trainer.config import load_config
from training.trainer.progress import Progress, parse_events
from training.trainer.recipe import train


def train_events(path: Path) -> list[dict]:
    """Train the run of config ``path`` in this process (one torch thread); its progress events."""
    return train_config_events(load_config(path))


def train_config_events(cfg) -> list[dict]:
    """Train the run of ``cfg`` (a TrainConfig) in this process (one torch thread); its progress events."""
    out = io.StringIO()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert train(cfg, Progress(cfg.output_dir, stream=out)) == 0
    finally:
        torch.set_num_threads(threads)
    return parse_events(out.getvalue())
