"""Check the machine before loading anything: GPUs visible, and a memory mode (placement.py) that
fits the free GPU and host memory by the estimate (memory_estimate.py); refuse with a clear
message otherwise."""

from __future__ import annotations

import json
import os

import psutil
import torch

from .config import TrainConfig

GIB = 1024 ** 3


class PreflightError(RuntimeError):
    """The environment cannot run this configuration; the message says what to change."""


PACK_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def deepspeed_config_path() -> str | None:
    """The DeepSpeed JSON named by the accelerate config (relative: to the cwd, else the pack root)."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return None
    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if not path:
        return None
    if not os.path.isabs(path) and not os.path.isfile(path) and os.path.isfile(os.path.join(PACK_ROOT, path)):
        path = os.path.join(PACK_ROOT, path)
    if not os.path.isfile(path):
        raise PreflightError(f"DeepSpeed config file not found: {path} (deepspeed_config_file in the accelerate config)")
    return path


def deepspeed_settings() -> dict:
    """Stage and offload of the DeepSpeed JSON this process was launched with ({} if none)."""
    path = deepspeed_config_path()
    if not path:
        return {}
    try:
        with open(path, encoding="utf-8") as handle:
            zero = json.load(handle).get("zero_optimization", {})
    except (OSError, ValueError):
        return {}
    return {"stage": int(zero.get("stage", 0)),
            "offload_param": zero.get("offload_param", {}).get("device", "none") != "none",
            "offload_optimizer": zero.get("offload_optimizer", {}).get("device", "none") != "none"}


def deepspeed_shape():
    """memory_estimate.DeepSpeedShape of the DeepSpeed JSON this process was launched with."""
    from .memory_estimate import DeepSpeedShape

    ds = deepspeed_settings()
    return DeepSpeedShape(stage=ds.get("stage", 0), offload_param=ds.get("offload_param", False),
                          offload_optimizer=ds.get("offload_optimizer", False))


def measured_memory(local: int) -> tuple[float | None, float]:
    """(free GiB of this process's GPU, or None without CUDA; host GiB available). The processes then
    agree on the slowest mode any of them chose (placement.agree)."""
    host_free = psutil.virtual_memory().available / GIB
    if not torch.cuda.is_available():
        return None, host_free
    index = int(os.environ.get("LOCAL_RANK", "0"))
    free, _ = torch.cuda.mem_get_info(index)
    return free / GIB, host_free


def check_environment(cfg: TrainConfig):
    """The memory mode this process runs (placement.Decision), after checking that the GPUs are
    there and the mode fits the free GPU and host memory; PreflightError otherwise."""
    from .memory_estimate import run_size
    from .placement import PlacementError, decide

    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    if torch.cuda.is_available() and local > torch.cuda.device_count():
        raise PreflightError(f"{local} processes per node but only {torch.cuda.device_count()} GPU(s) visible: set "
                             f"num_processes to {torch.cuda.device_count()} in the accelerate config or expose more GPUs")
    size = run_size(cfg)
    gpu_free, host_free = measured_memory(local)
    if gpu_free is None and cfg.mixed_precision != "no":
        from .memory_estimate import estimates

        least = min(e.gpu_gib for e in estimates(size, world, local, deepspeed_shape()).values())
        if least > 8:
            raise PreflightError("no GPU is visible (torch.cuda.is_available() is False) and these models need "
                                 f"about {least:.0f} GiB of GPU memory in the lightest memory mode; check "
                                 "CUDA_VISIBLE_DEVICES and the driver, or run the CPU demo (python -m training.demo)")
    try:
        return decide(size, cfg.memory, world, local, deepspeed_shape(), gpu_free, host_free)
    except PlacementError as exc:
        raise PreflightError(str(exc)) from None


def unchecked_decision(cfg: TrainConfig):
    """The memory mode without a memory check (preflight: false): the one asked, fast for auto."""
    from .memory_estimate import run_size
    from .placement import PlacementError, decide

    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    try:
        return decide(run_size(cfg), cfg.memory, world, local, deepspeed_shape(), None, None)
    except PlacementError as exc:
        raise PreflightError(str(exc)) from None
