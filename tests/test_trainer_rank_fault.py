"""A fault on one rank stops every rank together: 2 CPU processes under ZeRO-3 + CPU offload, one
rank's frames turn NaN (it draws a prompt whose embedding is NaN); both exit within seconds after
saving the last good step, and the run resumes once the cause is fixed."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from training.demo import PROMPTS, VALIDATION_PROMPTS, TEXT_DIM, write_tiny_run
from training.lora_format import read_lora
from training.tiny_models import random_prompt_embeddings
from training.trainer.step import step_rng
from training.trainer.models import write_prompt_embeddings
from training.trainer.progress import parse_events

PACK = Path(__file__).resolve().parents[1]
ENTRY = PACK / "training" / "train_reward_lora.py"
ACCELERATE = Path(sys.executable).with_name("accelerate")
POISON = "a prompt whose embedding is not finite"


def first_faulty_step(seed: int, prompts: list[str]) -> tuple[int, list[int]] | None:
    """(step index, ranks) where the poisoned prompt is first drawn, with the trainer's own draws."""
    for step in range(12):
        ranks = [r for r in (0, 1) if step_rng(seed, step, 0, r).choice(prompts) == POISON]
        if ranks:
            return step, ranks
    return None


def write_embeddings(path: Path, poisoned: bool) -> None:
    embeddings = random_prompt_embeddings([""] + PROMPTS + VALIDATION_PROMPTS + [POISON], dim=TEXT_DIM)
    if poisoned:
        embeddings[POISON] = torch.full_like(embeddings[POISON], float("nan"))
    write_prompt_embeddings(path, embeddings)


def test_nan_frames_on_one_rank_stop_both_ranks_after_saving(tmp_path):
    if not ACCELERATE.exists():
        pytest.skip("accelerate launcher not installed beside this Python")
    prompts = PROMPTS + [POISON]
    # a seed where only rank 1 draws the poison first, after two good steps
    seed = next(s for s in range(500) if (found := first_faulty_step(s, prompts)) and found[0] >= 2
                and found[1] == [1])
    fault_step, _ = first_faulty_step(seed, prompts)
    base = yaml.safe_load(write_tiny_run(tmp_path).read_text())
    emb = tmp_path / "poisoned_embeddings.safetensors"
    write_embeddings(emb, poisoned=True)
    base.update(prompts=prompts, prompt_embeddings=str(emb), seed=seed, max_steps=fault_step + 2,
                checkpoint_every=0, validation_every=0, output_dir=str(tmp_path / "run"))
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(base))
    launch = [str(ACCELERATE), "launch", "--config_file", "training/configs/accelerate_cpu_zero3_offload_2proc.yaml",
              str(ENTRY), "--config", str(config)]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}

    proc = subprocess.Popen(launch, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, cwd=PACK)
    events, last_step_at = [], None
    for line in proc.stdout:
        events += parse_events(line)
        if events and events[-1]["event"] == "step":
            last_step_at = time.monotonic()
    proc.wait(timeout=120)
    exited_after = time.monotonic() - last_step_at
    assert proc.returncode != 0
    steps = [e["step"] for e in events if e["event"] == "step"]
    assert steps == list(range(1, fault_step + 1))  # the faulty step is never reported as trained
    assert exited_after < 30, f"the ranks took {exited_after:.0f} s to stop after the fault"
    error = events[-1]
    assert error["event"] == "error" and error["kind"] == "runtime"
    assert "rank 1:" in error["message"] and "rank 0:" not in error["message"]
    assert "NaN" in error["message"] and f"step {fault_step + 1}" in error["message"]
    assert f"the last good step ({fault_step}) is saved" in error["message"]
    saved = [e for e in events if e["event"] == "checkpoint"]
    assert [(c["step"], c["reason"]) for c in saved] == [(fault_step, "fault")]
    latest = json.loads((tmp_path / "run" / "checkpoints" / "latest.json").read_text())
    assert latest["step"] == fault_step
    assert read_lora(tmp_path / "run" / "tiny_reward_lora.safetensors").metadata["steps"] == str(fault_step)

    # the cause fixed (a finite embedding), the same config resumes from the saved step and finishes
    write_embeddings(emb, poisoned=False)
    proc = subprocess.run(launch, capture_output=True, text=True, env=env, cwd=PACK, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    events = parse_events(proc.stdout)
    assert events[0]["event"] == "started" and events[0]["step"] == fault_step
    assert [e["step"] for e in events if e["event"] == "step"] == [fault_step + 1, fault_step + 2]
    assert events[-1]["event"] == "finished" and events[-1]["reason"] == "completed"

