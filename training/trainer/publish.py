"""Copy a run's LoRA into ComfyUI's loras folder, atomically, and never over a file the run did not
write (the trainer's tag and a config hash of this run folder in the LoRA's metadata)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ..safe_io import UserFileError, atomic_write, safetensors_metadata, write_json
from .failures import LaunchError
from .progress import TRAINER_TAG


PUBLISHED_FILE = "published.json"  # in the run folder: config hashes of the LoRAs it published


def lora_metadata(path: str | os.PathLike) -> dict[str, str] | None:
    """The safetensors header metadata of ``path``, or None when it is not a readable safetensors file."""
    try:
        return safetensors_metadata(path, "LoRA file")
    except (OSError, UserFileError):  # not safetensors / truncated: certainly not one of ours
        return None


def published_hashes(run_dir: str | os.PathLike) -> set[str]:
    try:
        data = json.loads((Path(run_dir) / PUBLISHED_FILE).read_text(encoding="utf-8"))
        return {str(h) for h in data.get("config_hashes", [])}
    except (OSError, ValueError, AttributeError):
        return set()


def check_publish_target(target: str | os.PathLike, run_dir: str | os.PathLike, config_hash: str | None) -> None:
    """Refuse to overwrite ``target`` unless it is absent or a LoRA this run folder wrote (trainer tag
    and a config hash of this run: the current one or one it published before, e.g. before a resume)."""
    target = Path(target)
    if not target.exists():
        return
    meta = lora_metadata(target) or {}
    ours = meta.get("trainer") == TRAINER_TAG and meta.get("config_hash") in (
        published_hashes(run_dir) | ({config_hash} if config_hash else set()))
    if not ours:
        who = ("another reward LoRA run" if meta.get("trainer") == TRAINER_TAG
               else "a file this run did not write")
        raise LaunchError(f"{target} already exists and is {who}; choose another output_name, "
                          "or delete or rename that file to replace it")


def publish_lora(source: str | os.PathLike, target: str | os.PathLike, run_dir: str | os.PathLike,
                 config_hash: str | None = None) -> Path:
    """Copy the run's LoRA to ``target`` atomically, after ``check_publish_target``; records the
    LoRA's config hash in the run folder so a resumed run may replace it."""
    source, target = Path(source), Path(target)
    written = (lora_metadata(source) or {}).get("config_hash")
    check_publish_target(target, run_dir, written or config_hash)
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(target, lambda tmp: shutil.copyfile(source, tmp))
    if written:
        write_json(Path(run_dir) / PUBLISHED_FILE, {"config_hashes": sorted(published_hashes(run_dir) | {written})})
    return target


