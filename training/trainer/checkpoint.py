"""Checkpoints that resume exactly, written so that a kill leaves the last good one intact.

Layout under ``<output_dir>/checkpoints/``:
  step-000100/lora.safetensors        the canonical LoRA at that step
  step-000100/trainer-rank0.pt        step, LoRA tensors (non-DeepSpeed), optimizer, LR
                                      scheduler, RNG states (torch, numpy, python)
  step-000100/ds/...                  DeepSpeed engine checkpoint (ZeRO runs: partitioned
                                      LoRA master weights + optimizer states, frozen base excluded)
  latest.json                         {"step": 100, "dir": "step-000100"}, written last
A checkpoint is written into ``.tmp-step-000100`` and renamed when complete; ``latest.json``
is replaced atomically afterwards, so a crash at any point leaves a complete checkpoint.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from ..safe_io import load_torch_weights_only, torch_save, write_json
from .lora import load_lora_state, lora_state

LATEST = "latest.json"


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def rng_states() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_states(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _plain(obj):
    """numpy RNG state holds an ndarray and python's a tuple: keep them weights_only-loadable."""
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    if isinstance(obj, tuple):
        return [_plain(o) for o in obj]
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    return obj


def _unplain_rng(state: dict) -> dict:
    numpy = state["numpy"]
    state["numpy"] = (numpy[0], numpy[1].numpy(), int(numpy[2]), int(numpy[3]), float(numpy[4]))
    python = state["python"]
    state["python"] = (int(python[0]), tuple(int(v) for v in python[1]), python[2])
    return state


def save_checkpoint(accelerator, model, optimizer, scheduler, step: int, output_dir: str | Path,
                    lora_writer, keep: int, deepspeed: bool) -> Path:
    """Collective: every rank calls it. Returns the checkpoint folder."""
    root = checkpoints_dir(output_dir)
    name = f"step-{step:06d}"
    tmp, final = root / f".tmp-{name}", root / name
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    state = {"step": step, "scheduler": scheduler.state_dict(), "rng": _plain(rng_states())}
    if deepspeed:
        model.save_checkpoint(str(tmp / "ds"), tag="state", exclude_frozen_parameters=True, save_latest=False)
    else:
        state["lora"] = lora_state(model)
        state["optimizer"] = optimizer.state_dict()
    lora = lora_writer(tmp / "lora.safetensors")  # gathers under ZeRO-3: all ranks
    torch_save(state, tmp / f"trainer-rank{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        write_json(root / LATEST, {"step": step, "dir": name})
        _prune(root, keep)
    accelerator.wait_for_everyone()
    del lora
    return final


def _prune(root: Path, keep: int) -> None:
    dirs = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in dirs[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    root = checkpoints_dir(output_dir)
    try:
        info = json.loads((root / LATEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    path = root / info.get("dir", "")
    return path if path.is_dir() else None


def recent_loras(output_dir: str | Path, count: int) -> list[Path]:
    dirs = sorted(p for p in checkpoints_dir(output_dir).glob("step-*") if (p / "lora.safetensors").is_file())
    return [d / "lora.safetensors" for d in dirs[-count:]]


def load_checkpoint(accelerator, model, optimizer, scheduler, path: Path, deepspeed: bool) -> int:
    """Restore everything saved by ``save_checkpoint``; returns the step to continue from."""
    state_file = path / f"trainer-rank{accelerator.process_index}.pt"
    state = load_torch_weights_only(state_file, "trainer checkpoint")
    if deepspeed:
        model.load_checkpoint(str(path / "ds"), tag="state", load_module_strict=False,
                              load_lr_scheduler_states=False)
    else:
        load_lora_state(model, state["lora"])
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_states(_unplain_rng(state["rng"]))
    return int(state["step"])
