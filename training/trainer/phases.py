"""``expert: both``: the high-noise LoRA, then the low-noise LoRA, as two trainer runs.

The second run samples with the first run's LoRA merged into its (frozen) high-noise expert
(``frozen_expert_lora``), so each LoRA learns on the trajectories the pair will produce. Each
phase has its own folder and LoRA name under the run: ``high_noise/<name>_high_noise.safetensors``
and ``low_noise/<name>_low_noise.safetensors``, which the Dual LoRA Loader pairs. A phase that
finished all its steps is not run again, so resuming continues with the right phase.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from .config import TrainConfig
from .progress import METRICS_FILE

PHASE_EXPERTS = ("high", "low")


def phase_configs(cfg: TrainConfig) -> list[TrainConfig]:
    """The runs ``cfg`` stands for: itself, or for ``expert: both`` the high then the low phase."""
    if cfg.expert != "both":
        return [cfg]
    out = Path(cfg.output_dir)
    high = dataclasses.replace(cfg, expert="high", output_dir=str(out / "high_noise"),
                               output_name=f"{cfg.output_name}_high_noise")
    low = dataclasses.replace(cfg, expert="low", output_dir=str(out / "low_noise"),
                              output_name=f"{cfg.output_name}_low_noise", frozen_expert_lora=str(high.lora_path),
                              frozen_expert_lora_strength=1.0)
    return [high, low]


def finished_event(cfg: TrainConfig) -> dict | None:
    """The last ``finished`` event in the phase's metrics.jsonl, or None."""
    path = Path(cfg.output_dir) / METRICS_FILE
    if not path.is_file():
        return None
    last = None
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue  # a line cut by a kill
        if isinstance(event, dict) and event.get("event") == "finished":
            last = event
    return last


def phase_complete(cfg: TrainConfig) -> bool:
    """True when the phase trained all its steps under this config and its LoRA is there."""
    from ..lora_format import read_lora

    event = finished_event(cfg)
    if not event or event.get("reason") != "completed" or event.get("step") != cfg.max_steps:
        return False
    if not cfg.lora_path.is_file():
        return False
    metadata = read_lora(cfg.lora_path).metadata
    return metadata.get("config_hash") == cfg.config_hash() and metadata.get("steps") == str(cfg.max_steps)


def write_phase_configs(config_path: str | Path) -> list[Path]:
    """The run.yaml of each phase of an ``expert: both`` config, in the phases' folders (to launch
    them one after the other from a shell, as the node does)."""
    import yaml

    from .config import load_config

    cfg = load_config(config_path)
    paths = []
    for phase in phase_configs(cfg):
        path = Path(phase.output_dir) / "run.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(phase.to_dict(), sort_keys=False), encoding="utf-8")
        paths.append(path)
    return paths


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 3 or sys.argv[1] != "--config":
        sys.exit("usage: python -m training.trainer.phases --config both.yaml  (writes the phases' run.yaml files)")
    for written in write_phase_configs(sys.argv[2]):
        print(f"accelerate launch [--config_file ...] training/train_reward_lora.py --config {written}")
