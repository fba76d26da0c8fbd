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


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4,
                "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
# reward models at their real sizes (parameters): HPS v2.1 is an open_clip ViT-H/14 (~2.0 GB
# in bf16), MPS a ViT-H/14 CLIP with its condition fusion (~2.2 GB in bf16)
REWARD_PARAMS = {"hps": 0.99e9, "mps": 1.1e9}


def safetensors_header(path: str) -> dict | None:
    """The JSON header of a safetensors file (no tensor data read), or None."""
    try:
        with open(path, "rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            if not 2 <= size <= 100 * 2 ** 20:
                return None
            header = json.loads(handle.read(size))
    except (OSError, ValueError):
        return None
    return header if isinstance(header, dict) else None


def tensor_shapes(path: str) -> dict[str, tuple[str, list[int]]] | None:
    """{key: (dtype, shape)} from a safetensors header, or None (not safetensors / unreadable)."""
    header = safetensors_header(path) if path else None
    if header is None:
        return None
    return {k: (v["dtype"], v["shape"]) for k, v in header.items()
            if k != "__metadata__" and isinstance(v, dict) and "dtype" in v}


def weights_gib(path: str, compute_bytes: int) -> float:
    """Memory of a weights file once loaded at ``compute_bytes`` per floating value: counted
    from the safetensors header (fp8 files dequantise to 2 bytes, so they double); other
    files: their size."""
    shapes = tensor_shapes(path)
    if shapes is None:
        return _file_gib(path)
    total = 0
    for dtype, shape in shapes.values():
        n = 1
        for d in shape:
            n *= d
        total += n * (compute_bytes if dtype.startswith(("F", "BF")) else _DTYPE_BYTES.get(dtype, 1))
    return total / GIB


def lora_params(cfg: TrainConfig) -> int:
    """LoRA parameters of the trained expert: rank x (in + out) per adapted Linear, from the
    file's header (estimated as 1.5 % of the expert's parameters when it cannot be read)."""
    path = cfg.high_noise_model if cfg.expert == "high" else cfg.low_noise_model
    shapes = tensor_shapes(path)
    if shapes is None:
        return int(0.015 * _file_gib(path) * GIB / 2)
    total = 0
    for key, (_, shape) in shapes.items():
        if not key.endswith(".weight") or len(shape) != 2:
            continue
        native = key[: -len(".weight")]
        for prefix in ("model.diffusion_model.", "diffusion_model.", "model."):
            if native.startswith(prefix):
                native = native[len(prefix):]
                break
        if any(part in native for part in cfg.lora_exclude):
            continue
        if cfg.lora_targets != "all_linear" and not any(native == t or native.endswith("." + t)
                                                         for t in cfg.lora_targets):
            continue
        total += cfg.lora_rank * (shape[0] + shape[1])
    return total


def estimate_memory_gib(cfg: TrainConfig, world_size: int, ds: dict) -> tuple[float, float]:
    """(GPU GiB per process, host GiB per process at the loading peak): coarse upper estimates.

    Weights at the run's precision (counted from the safetensors headers; fp8 files
    dequantise to 2 bytes per value). On the GPU: the other expert whole (it is not handed to
    DeepSpeed), the trained one whole (plain, ZeRO-2), partitioned (ZeRO-3) or not at all
    (ZeRO-3 + parameter offload); the LoRA in float32 with its gradients (8 bytes per
    parameter, partitioned under ZeRO-3) and AdamW's two moments (8 bytes, in host memory with
    optimizer offload); the VAE; every reward model at its real size; the activations of one
    checkpointed window forward (~0.6 GiB per 1k tokens at A14B width) and 1 GiB of margin.
    The umt5 encoder (when used) runs alone at the start, so the GPU peak is the larger of the
    two. Host: every process reads both experts (and the umt5 file) before handing them on,
    plus the offloaded states.
    """
    compute = 4 if cfg.mixed_precision == "no" else 2
    high, low = weights_gib(cfg.high_noise_model, compute), weights_gib(cfg.low_noise_model, compute)
    trained, other = (high, low) if cfg.expert == "high" else (low, high)
    vae = weights_gib(cfg.vae, compute)
    rewards = sum(REWARD_PARAMS.get(s.model, 1e9) * compute for s in cfg.rewards + cfg.held_out_rewards) / GIB
    umt5 = weights_gib(cfg.text_encoder, compute) if cfg.text_encoder else 0.0
    lora = lora_params(cfg)
    lora_weights_grads = lora * 8 / GIB
    adam = lora * 8 / GIB
    tokens = cfg.latent_frames * (cfg.height // 16) * (cfg.width // 16) * cfg.batch_size * (2 if cfg.guidance_scale > 1 else 1)
    activations = 0.6 * tokens / 1000 * max(trained / 28.0, 0.01) * cfg.backprop_steps
    stage3 = ds.get("stage") == 3
    gpu = other + vae + rewards + activations + 1.0
    if stage3:
        gpu += 0.0 if ds.get("offload_param") else trained / world_size
        gpu += lora_weights_grads / world_size
    else:
        gpu += trained + lora_weights_grads
    host_states = 0.0
    if ds.get("offload_optimizer"):
        host_states += adam / (world_size if stage3 else 1)
    else:
        gpu += adam / (world_size if ds.get("stage") else 1)
    gpu = max(gpu, umt5 + 1.0)
    host = high + low + umt5 + host_states + (trained / world_size if stage3 and ds.get("offload_param") else 0) + 2.0
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
