"""Check the machine before loading anything: GPUs visible, free GPU and host memory
against an estimate for the chosen preset; refuse with a clear message otherwise."""

from __future__ import annotations

import json
import os

import psutil
import torch

from .config import TrainConfig

GIB = 1024 ** 3


class PreflightError(RuntimeError):
    """The environment cannot run this configuration; the message says what to change."""


def _file_gib(path: str) -> float:
    return os.path.getsize(path) / GIB if path and os.path.isfile(path) else 0.0


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


def estimate_memory_gib(cfg: TrainConfig, world_size: int, ds: dict) -> tuple[float, float]:
    """(GPU GiB per process, host GiB per process at the loading peak): coarse upper estimates.

    Weights: both experts at 2 bytes per parameter (the file sizes; fp8 files dequantise to
    bf16, hence x2). Every process reads both experts into host memory before the trained one
    is handed to DeepSpeed. On the GPU: the other expert whole, the trained one whole (plain,
    ZeRO-2), partitioned (ZeRO-3) or not at all (ZeRO-3 + param offload), plus the activations
    of one checkpointed window forward (~0.6 GiB per 1k tokens at A14B width) and ~2 GiB for
    the VAE and the reward models.
    """
    def bf16_gib(path: str) -> float:
        return _file_gib(path) * (2 if "fp8" in os.path.basename(path).lower() else 1)

    high, low = bf16_gib(cfg.high_noise_model), bf16_gib(cfg.low_noise_model)
    trained, other = (high, low) if cfg.expert == "high" else (low, high)
    tokens = cfg.latent_frames * (cfg.height // 16) * (cfg.width // 16) * cfg.batch_size * (2 if cfg.guidance_scale > 1 else 1)
    activations = 0.6 * tokens / 1000 * max(trained / 28.0, 0.01) * cfg.backprop_steps
    gpu = other + activations + 2.0
    if ds.get("stage") == 3:
        gpu += 0.0 if ds.get("offload_param") else trained / world_size
    else:
        gpu += trained
    host = high + low + 2.0
    return gpu, host


def check_environment(cfg: TrainConfig) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    ds = deepspeed_settings()
    gpu_need, host_need = estimate_memory_gib(cfg, world, ds)
    if not torch.cuda.is_available():
        if cfg.mixed_precision != "no" and gpu_need > 8:
            raise PreflightError("no GPU is visible (torch.cuda.is_available() is False) and these models need "
                                 f"about {gpu_need:.0f} GiB; check CUDA_VISIBLE_DEVICES and the driver, or run the "
                                 "CPU demo (python -m training.demo)")
    else:
        count = torch.cuda.device_count()
        if local > count:
            raise PreflightError(f"{local} processes per node but only {count} GPU(s) visible: set num_processes "
                                 f"to {count} in the accelerate config or expose more GPUs")
        index = int(os.environ.get("LOCAL_RANK", "0"))
        free, total = torch.cuda.mem_get_info(index)
        if free / GIB < gpu_need:
            raise PreflightError(f"GPU {index}: {free / GIB:.1f} of {total / GIB:.1f} GiB free, this preset needs about "
                                 f"{gpu_need:.1f} GiB per GPU; use the ZeRO-3 offload preset, more GPUs, fewer frames "
                                 f"(frames={cfg.frames}) or a smaller resolution ({cfg.width}x{cfg.height})")
    host_free = psutil.virtual_memory().available / GIB
    if host_free < host_need * local:
        raise PreflightError(f"host memory: {host_free:.1f} GiB available, {local} process(es) loading both experts "
                             f"need about {host_need * local:.1f} GiB; use fewer processes per machine, close other "
                             "programs or add memory")
