"""Which devices a run uses: the node's ``gpus`` text parsed into processes and GPUs, the caller's
GPU numbers mapped through its own CUDA_VISIBLE_DEVICES (ids or UUIDs) to the physical GPUs."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from .failures import LaunchError


def physical_gpu_ids(gpu_ids, env: dict | None = None) -> tuple[str, ...]:
    """The caller's GPU numbers (as its torch counts them) as entries of its own
    ``CUDA_VISIBLE_DEVICES`` (ids or UUIDs), so a child sees the same physical GPUs."""
    visible = (os.environ if env is None else env).get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return tuple(str(g) for g in gpu_ids)
    entries = [e.strip() for e in visible.split(",") if e.strip()]
    missing = [str(g) for g in gpu_ids if int(g) >= len(entries)]
    if missing:
        raise LaunchError(f"GPU id(s) {', '.join(missing)} not visible: CUDA_VISIBLE_DEVICES={visible!r} "
                          f"lists {len(entries)} GPU(s)")
    return tuple(entries[int(g)] for g in gpu_ids)


@dataclass(frozen=True)
class DeviceChoice:
    """Processes to start and the devices they see: ``gpu_ids`` (the caller's CUDA numbers) or CPU
    processes."""

    num_processes: int
    gpu_ids: tuple[str, ...] = ()

    @property
    def cpu(self) -> bool:
        return not self.gpu_ids

    def physical_ids(self, env: dict | None = None) -> tuple[str, ...]:
        return physical_gpu_ids(self.gpu_ids, env)

    @property
    def lock_keys(self) -> list[str]:
        """One lock per physical GPU (through the caller's CUDA_VISIBLE_DEVICES); CPU runs (tests,
        demos) share the cores and take no device lock."""
        return [f"gpu{re.sub(r'[^A-Za-z0-9-]', '_', g)}" for g in self.physical_ids()]

    def lock_names(self) -> dict[str, str]:
        """Lock key -> the GPU as the refusal names it."""
        return {key: f"GPU {phys}" + (f" (ComfyUI's GPU {rel})" if phys != rel else "")
                for key, phys, rel in zip(self.lock_keys, self.physical_ids(), self.gpu_ids)}


def parse_devices(text: str, visible_gpus: int) -> DeviceChoice:
    """``"auto"``/``""`` (every visible GPU, else 1 CPU process), ``"2"`` (the first 2 GPUs),
    ``"0,1"`` / ``"1"``-with-comma ids, ``"cpu"`` / ``"cpu:2"`` (CPU processes, tests and demos)."""
    text = (text or "").strip().lower().replace(" ", "")
    if text in ("", "auto", "all"):
        if visible_gpus == 0:
            return DeviceChoice(1)
        return DeviceChoice(visible_gpus, tuple(str(i) for i in range(visible_gpus)))
    if text.startswith("cpu"):
        count = text[3:].lstrip(":") or "1"
        if not count.isdigit() or int(count) < 1:
            raise LaunchError(f"gpus '{text}': write cpu or cpu:N with N >= 1 CPU processes")
        return DeviceChoice(int(count))
    if "," in text or text.endswith(","):
        ids = [i for i in text.split(",") if i]
        if not ids or not all(i.isdigit() for i in ids) or len(set(ids)) != len(ids):
            raise LaunchError(f"gpus '{text}': write GPU ids like 0,1 (distinct numbers)")
        missing = [i for i in ids if int(i) >= visible_gpus]
        if missing:
            raise LaunchError(f"gpus '{text}': GPU id(s) {', '.join(missing)} not visible; "
                              f"{_visible_text(visible_gpus)}")
        return DeviceChoice(len(ids), tuple(ids))
    if text.isdigit():
        count = int(text)
        if count < 1:
            raise LaunchError(f"gpus '{text}': give at least 1 GPU, 'auto' or 'cpu'")
        if count > visible_gpus:
            raise LaunchError(f"gpus '{text}': {count} GPU(s) requested but {_visible_text(visible_gpus)}; "
                              "lower the count or expose more GPUs")
        return DeviceChoice(count, tuple(str(i) for i in range(count)))
    raise LaunchError(f"gpus '{text}': write auto, a GPU count (2), GPU ids (0,1) or cpu[:N]")


def _visible_text(visible: int) -> str:
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    where = f" (CUDA_VISIBLE_DEVICES={env!r})" if env is not None else ""
    return f"only {visible} GPU(s) are visible{where}"


