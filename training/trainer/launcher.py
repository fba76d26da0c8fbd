"""The trainer's command line and environment: ``accelerate launch [preset] ...train_reward_lora.py
--config run.yaml``, from an argument list (no shell), with the devices' CUDA_VISIBLE_DEVICES.

The parts of running a trainer from another program (the ComfyUI node): devices.py (which GPUs),
locks.py (one run per GPU and per run folder), this module (what to start), process.py (start it,
follow its events, stop it and its whole process tree), publish.py (copy its LoRA into ComfyUI's
loras folder), failures.py (what to tell the user). None of them imports ComfyUI.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

from .devices import DeviceChoice
from .failures import LaunchError
from .progress import PARENT_PID_ENV

TRAINING_DIR = Path(__file__).resolve().parents[1]
ENTRY_SCRIPT = TRAINING_DIR / "train_reward_lora.py"
CONFIGS_DIR = TRAINING_DIR / "configs"
PACK_ROOT = TRAINING_DIR.parent  # the presets name their DeepSpeed JSON relative to it: launch from here
# DeepSpeed presets -> accelerate config files in training/configs/ for (GPU runs, CPU runs);
# --num_processes overrides the files' count. None: no DeepSpeed (plain DDP / one process).
PRESETS = {
    "zero3_offload": ("accelerate_zero3_offload.yaml", "accelerate_cpu_zero3_offload_2proc.yaml"),
    "zero3": ("accelerate_zero3_multi_gpu.yaml", None),
    "zero2": ("accelerate_zero2_multi_gpu.yaml", None),
    "none": (None, None),
}


def preset_config_file(preset: str, cpu: bool = False) -> Path | None:
    if preset not in PRESETS:
        raise LaunchError(f"deepspeed preset '{preset}' is unknown; choose one of {', '.join(PRESETS)}")
    gpu_file, cpu_file = PRESETS[preset]
    if preset == "none":
        return None
    name = cpu_file if cpu else gpu_file
    if name is None:
        raise LaunchError(f"deepspeed preset '{preset}' needs GPUs; on CPU use zero3_offload or none")
    path = CONFIGS_DIR / name
    if not path.is_file():
        raise LaunchError(f"deepspeed preset '{preset}': its accelerate config {path} is missing; "
                          "reinstall the pack or choose the preset 'none'")
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def build_command(config_path: str | os.PathLike, devices: DeviceChoice, preset: str = "none",
                  python: str | None = None, port: int | None = None) -> list[str]:
    """``python -m accelerate.commands.launch [...] training/train_reward_lora.py --config run.yaml``."""
    cmd = [python or sys.executable, "-m", "accelerate.commands.launch"]
    preset_file = preset_config_file(preset, cpu=devices.cpu)
    if preset_file is not None:
        cmd += ["--config_file", str(preset_file)]
    elif devices.num_processes > 1:
        cmd += ["--multi_gpu"]  # torchrun-style workers; on CPU the trainer uses the gloo backend
    cmd += ["--num_processes", str(devices.num_processes), "--num_machines", "1",
            "--dynamo_backend", "no"]
    if preset_file is None:
        cmd += ["--mixed_precision", "no"]  # the trainer casts itself (config mixed_precision)
    if devices.num_processes > 1:
        cmd += ["--main_process_port", str(port or free_port())]
    cmd += [str(ENTRY_SCRIPT), "--config", str(config_path)]
    return cmd


def build_env(devices: DeviceChoice, base: dict | None = None, threads: int | None = None) -> dict[str, str]:
    """Environment of the trainer: ``CUDA_VISIBLE_DEVICES`` from the choice, mapped through the
    caller's own ``CUDA_VISIBLE_DEVICES`` ("" for CPU runs). CPU runs get one thread per process
    (``OMP_NUM_THREADS`` and ``MKL_NUM_THREADS`` 1: a process per core; a tiny run on 2 busy cores
    took 10x longer with 2 threads) unless the caller's environment sets ``OMP_NUM_THREADS``;
    ``threads`` sets it for any run."""
    env = dict(os.environ if base is None else base)
    env["CUDA_VISIBLE_DEVICES"] = ",".join(devices.physical_ids(env))
    env["PYTHONUNBUFFERED"] = "1"
    env[PARENT_PID_ENV] = str(os.getpid())
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    elif devices.cpu and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = "1"
        env.setdefault("MKL_NUM_THREADS", "1")
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # never inherit a parent's distributed role
    return env


