"""Checkpoints that resume exactly, written so that a kill leaves the last good one intact.

Layout under ``<output_dir>/checkpoints/``:
  step-000100/lora.safetensors        the canonical LoRA at that step
  step-000100/trainer-rank0.pt        step, LR scheduler; without DeepSpeed also the LoRA
                                      tensors and the optimizer
  step-000100/run.json                the run's config, config hash, world size, best
                                      validation score and gaming-guard state (rank 0)
  step-000100/ds/...                  DeepSpeed engine checkpoint (ZeRO runs: partitioned
                                      LoRA master weights + optimizer states, frozen base excluded)
  latest.json                         {"step": 100, "dir": "step-000100"}, written last
No RNG states are saved: every random draw of a step derives from (seed, step, micro-step,
rank) and validation noise from validation_seed (loop.py), so nothing else needs restoring.

A checkpoint is written into ``.tmp-step-000100`` and renamed when complete; re-saving a
step that exists renames the old folder aside first and deletes it only after the new one
and ``latest.json`` are in place. A save that fails (a full disk: ``DiskFullError``, which
names the last complete checkpoint) or is killed leaves no ``.tmp-*`` folder behind once the
next save starts. ``latest_checkpoint`` falls back to the newest complete
folder when ``latest.json`` is missing or names a folder that is gone.

Resuming checks the recorded config against the new one: a change to any field outside
``RESUME_HARMLESS`` is refused, naming the fields (``CheckpointMismatch``, a ConfigError).
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

from ..safe_io import DiskFullError, free_space_text, is_disk_full, load_torch_weights_only, torch_save, write_json
from .config import ConfigError, TrainConfig
from .lora import load_lora_state, lora_state

LATEST = "latest.json"
RUN_INFO = "run.json"
_STEP_DIR = re.compile(r"^(?:\.replaced-)?step-(\d+)$")

# Config fields that may change between a checkpoint and its resume: they do not change
# what was trained so far. max_steps also sets the length of linear/cosine LR schedules,
# whose remaining part follows the new value.
RESUME_HARMLESS = ("max_steps", "checkpoint_every", "checkpoints_keep", "validation_every", "sample_every",
                   "average_last_checkpoints", "gaming_guard", "gaming_patience", "preflight", "resume", "output_dir",
                   "memory", "base_model_name")


class CheckpointMismatch(ConfigError):
    """The checkpoint was written by a run with other settings."""


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def step_of(path: Path) -> int | None:
    """The step of a checkpoint folder (``step-000100``, or one renamed aside), from its name."""
    match = _STEP_DIR.match(path.name)
    return int(match.group(1)) if match else None


def _complete(path: Path) -> bool:
    return path.is_dir() and (path / "trainer-rank0.pt").is_file() and (path / RUN_INFO).is_file()


def step_dirs(root: Path) -> list[Path]:
    """Complete ``step-*`` folders, oldest step first (by number, not by name)."""
    dirs = [p for p in root.glob("step-*") if step_of(p) is not None and _complete(p)]
    return sorted(dirs, key=step_of)


def move_aside(output_dir: str | Path) -> Path | None:
    """Starting over (``resume: false``): rename an earlier run's checkpoints folder to
    ``checkpoints-replaced-<UTC time>`` so that no file of it is pruned, averaged or resumed.
    Returns the new name, or None when there was nothing."""
    root = checkpoints_dir(output_dir)
    if not root.exists() or not any(root.iterdir()):
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    target = root.with_name(f"checkpoints-replaced-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = root.with_name(f"checkpoints-replaced-{stamp}-{n}")
    root.rename(target)
    return target


def save_checkpoint(accelerator, model, optimizer, scheduler, step: int, output_dir: str | Path,
                    lora_writer, keep: int, deepspeed: bool, run_info: dict) -> Path:
    """Collective: every rank calls it. Returns the checkpoint folder.

    ``run_info``: JSON data written by rank 0 (config, best score, guard state, ...). A full disk
    raises DiskFullError saying which checkpoint is the last complete one; nothing of the failed
    one is left (nor of one a kill interrupted)."""
    root = checkpoints_dir(output_dir)
    name = f"step-{step:06d}"
    tmp, final, replaced = root / f".tmp-{name}", root / name, root / f".replaced-{name}"
    try:
        if accelerator.is_main_process:
            for stale in root.glob(".tmp-step-*"):  # this step's, or one of a save a kill interrupted
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir(parents=True, exist_ok=True)
        accelerator.wait_for_everyone()
        state = {"step": step, "scheduler": scheduler.state_dict()}
        if deepspeed:
            model.save_checkpoint(str(tmp / "ds"), tag="state", exclude_frozen_parameters=True, save_latest=False)
        else:
            state["lora"] = lora_state(model)
            state["optimizer"] = optimizer.state_dict()
        lora_writer(tmp / "lora.safetensors")  # gathers under ZeRO-3: all ranks
        torch_save(state, tmp / f"trainer-rank{accelerator.process_index}.pt")
        if accelerator.is_main_process:
            write_json(tmp / RUN_INFO, {"step": step, **run_info})
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            # the same step saved again (a rerun of a finished run): the old folder stays whole
            # until the new one and latest.json are in place
            shutil.rmtree(replaced, ignore_errors=True)
            if final.exists():
                final.rename(replaced)
            tmp.rename(final)
            write_json(root / LATEST, {"step": step, "dir": name})
            shutil.rmtree(replaced, ignore_errors=True)
            _prune(root, keep)
    except Exception as exc:
        full = is_disk_full(exc, root)  # before the partial files are deleted
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        if full:
            raise checkpoint_disk_full(output_dir, step) from exc
        raise
    accelerator.wait_for_everyone()
    return final


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def checkpoint_disk_full(output_dir: str | Path, step: int) -> DiskFullError:
    """What a full disk while saving checkpoint ``step`` means for the run, and what to do."""
    root = checkpoints_dir(output_dir)
    previous = latest_checkpoint(output_dir)
    where = f"no space left in {root}; {free_space_text(root)} now"
    if previous is None:
        kept = ("There is no earlier checkpoint: after freeing space, run again (in ComfyUI queue again) and "
                "training starts from step 0.")
        need = "space"
    else:
        last = step_of(previous)
        kept = (f"The last complete checkpoint, step {last} ({previous}), and the LoRA files in {output_dir} are "
                f"unchanged: after freeing space, run again (in ComfyUI queue again) with resume on and training "
                f"continues from step {last}.")
        need = f"at least {_folder_bytes(previous) / 2 ** 20:.1f} MiB (the size of one checkpoint)"
    return DiskFullError(f"disk full: checkpoint step {step} could not be saved ({where}); nothing of it was kept. "
                         f"{kept} Free {need} on that disk, lower checkpoints_keep, or move the run folder to a "
                         "larger disk.", root)


def _prune(root: Path, keep: int) -> None:
    for old in step_dirs(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The folder latest.json names; if it is missing or dangling, the newest complete
    ``step-*`` folder (or one renamed aside by an interrupted re-save)."""
    root = checkpoints_dir(output_dir)
    try:
        info = json.loads((root / LATEST).read_text(encoding="utf-8"))
        path = root / str(info.get("dir", ""))
        if info.get("dir") and _complete(path):
            return path
    except (OSError, ValueError, AttributeError):
        pass
    candidates = [p for p in root.glob("*step-*") if step_of(p) is not None and _complete(p)]
    return max(candidates, key=lambda p: (step_of(p), p.name.startswith("step-")), default=None)


def recent_loras(output_dir: str | Path, count: int) -> list[Path]:
    dirs = [d for d in step_dirs(checkpoints_dir(output_dir)) if (d / "lora.safetensors").is_file()]
    return [d / "lora.safetensors" for d in dirs[-count:]]


def read_run_info(path: Path) -> dict:
    try:
        return json.loads((path / RUN_INFO).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointMismatch("resume", f"checkpoint {path} has no readable {RUN_INFO} ({exc}); set resume: "
                                 "false to start over (the old checkpoints are moved aside)") from exc


def check_resumable(cfg: TrainConfig, info: dict, world_size: int, path: Path, deepspeed: bool | None = None) -> None:
    """Refuse a resume whose settings differ from the checkpoint's, naming the fields (a field the
    checkpoint's trainer did not have yet counts as its default)."""
    from .config import DEPRECATED_KEYS, FIELDS, default

    old = {DEPRECATED_KEYS.get(k, k): v for k, v in (info.get("config") or {}).items()}
    old = {**{k: default(k) for k in FIELDS if k not in old}, **old}
    new = cfg.to_dict()
    changed = sorted(k for k in set(old) | set(new) if k not in RESUME_HARMLESS and old.get(k) != new.get(k))
    if changed:
        detail = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:6])
        raise CheckpointMismatch(changed[0], f"the run config differs from the one of checkpoint {path} in "
                                 f"{', '.join(changed)} ({detail}). Resuming would mix two runs: restore the old "
                                 "value(s), or set resume: false to start over (the old checkpoints are moved "
                                 f"aside). Fields that may change on resume: {', '.join(RESUME_HARMLESS)}")
    if deepspeed is not None and "deepspeed" in info and bool(info["deepspeed"]) != deepspeed:
        was, now = ("with", "without") if info["deepspeed"] else ("without", "with")
        raise CheckpointMismatch("memory", f"checkpoint {path} was written {was} DeepSpeed and this run is {now} it "
                                 "(memory mode low runs without DeepSpeed, the other modes with the preset): keep "
                                 "the memory mode and preset of the checkpoint, or set resume: false to start over")
    if int(info.get("world_size", world_size)) != world_size:
        raise CheckpointMismatch("resume", f"checkpoint {path} was written by {info['world_size']} process(es), "
                                 f"this run has {world_size}: launch with num_processes={info['world_size']} or "
                                 "set resume: false to start over")


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
    return int(state["step"])
