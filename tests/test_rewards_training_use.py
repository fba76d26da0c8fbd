"""PickScore and the aesthetic predictor as training rewards: the trainer accepts their kinds, loads
the files and backpropagates through them into the LoRA (tiny models, 2 steps on CPU)."""

from __future__ import annotations

from pathlib import Path

from tests.helpers.trainer_runs import train_events as _train
from training.demo import write_tiny_run
from training.rewards.tiny import (
    write_tiny_aesthetic_checkpoint,
    write_tiny_pickscore_checkpoint,
)
from training.trainer.config import load_config


def test_pickscore_and_aesthetic_train_a_lora(tmp_path):
    pickscore = write_tiny_pickscore_checkpoint(tmp_path / "PickScore_v1_tiny.safetensors", seed=1)
    aesthetic = write_tiny_aesthetic_checkpoint(tmp_path / "laion_aesthetic_tiny.safetensors", seed=2)
    path = write_tiny_run(tmp_path / "run", max_steps=2, validation_every=0, checkpoint_every=0, resume=False,
                          rewards=[{"model": "pickscore", "path": pickscore, "weight": 0.01},
                                   {"model": "aesthetic", "path": aesthetic, "weight": 0.1}],
                          held_out_rewards=[])
    steps = [e for e in _train(path) if e["event"] == "step"]
    assert len(steps) == 2 and set(steps[0]["rewards"]) == {"pickscore", "aesthetic"}
    assert all(s["grad_norm"] > 0 for s in steps)  # the gradient reached the LoRA through both rewards
    assert Path(load_config(path).lora_path).is_file()
