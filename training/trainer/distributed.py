"""The processes of a run: the accelerator (with or without DeepSpeed) and how the ranks agree.

Under ZeRO-3 every forward and every LoRA gather is a collective: all ranks run the same number
of forwards, and every decision that leads to one (a stop or save request, a new best LoRA, the
gaming guard, a fault in a step) is made so that every rank acts on the same answer.
"""

from __future__ import annotations

import contextlib
import json
import os

import torch

from .config import ConfigError, TrainConfig, resolve_accumulation


def make_accelerator(cfg: TrainConfig, deepspeed: bool = True):
    """(accelerate.Accelerator, uses DeepSpeed, micro-steps per optimizer step). With DeepSpeed (when
    launched with a DeepSpeed preset and ``deepspeed``), our DeepSpeed JSON with the run's values;
    ``deepspeed=False`` (memory mode low) runs without it whatever the launcher set."""
    from accelerate import Accelerator, DeepSpeedPlugin, InitProcessGroupKwargs

    world = int(os.environ.get("WORLD_SIZE", "1"))
    accumulation = resolve_accumulation(cfg, world)
    cuda = torch.cuda.is_available()
    handlers = [] if cuda or world == 1 else [InitProcessGroupKwargs(backend="gloo")]
    launched_with = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if launched_with and not deepspeed:
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "false"  # accelerate would build a plugin from it
    use_ds = launched_with and deepspeed
    if cfg.mixed_precision == "fp16" and not use_ds:
        # fp16 backward needs loss scaling, which only DeepSpeed's fp16 engine provides here
        raise ConfigError("mixed_precision", "fp16 needs DeepSpeed (its dynamic loss scaling) and this run has no "
                          "DeepSpeed: use bf16 (or 'no' on CPU), or launch with a DeepSpeed accelerate config "
                          "such as training/configs/accelerate_zero3_offload.yaml")
    if not use_ds:
        accelerator = Accelerator(gradient_accumulation_steps=accumulation, mixed_precision="no", cpu=not cuda,
                                  kwargs_handlers=handlers)
        return accelerator, False, accumulation
    import deepspeed.ops

    if not cuda:
        # The shared-memory comm op serves inference only and would be JIT-compiled at start.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    from .preflight import deepspeed_config_path

    with open(deepspeed_config_path(), encoding="utf-8") as handle:
        ds = json.load(handle)
    for key in ("optimizer", "scheduler", "train_batch_size"):
        ds.pop(key, None)
    ds["train_micro_batch_size_per_gpu"] = cfg.batch_size
    ds["gradient_accumulation_steps"] = accumulation
    ds["gradient_clipping"] = cfg.max_grad_norm  # really applied by the engine (0 = off)
    ds["zero_force_ds_cpu_optimizer"] = False  # our torch optimizer: no cpu_adam JIT build
    ds["bf16"] = {"enabled": cfg.mixed_precision == "bf16"}
    ds["fp16"] = {"enabled": cfg.mixed_precision == "fp16"}
    ds.setdefault("steps_per_print", 10 ** 9)
    accelerator = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=ds), kwargs_handlers=handlers,
                              gradient_accumulation_steps=accumulation)
    return accelerator, True, accumulation


@contextlib.contextmanager
def no_zero_init(accelerator, use_ds: bool):
    """Build models whole: transformers would construct them under zero.Init (empty params)."""
    if not use_ds:
        yield
        return
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        accelerator.state.deepspeed_plugin.set_deepspeed_weakref()


class StepFault(RuntimeError):
    """A fault on one or more ranks that every rank knows of (raised on all ranks together)."""


def agree_on_fault(local: str | None, accelerator) -> str | None:
    """Collective: every rank learns whether any rank faulted, and what each said. Called by every
    rank at the same point, before the next collective a faulted rank would not reach."""
    world = accelerator.num_processes
    if world == 1:
        return f"rank 0: {local}" if local else None
    flag = torch.tensor([1.0 if local else 0.0], device=accelerator.device)
    if float(accelerator.reduce(flag, reduction="sum").item()) == 0:
        return None
    messages: list = [None] * world
    torch.distributed.all_gather_object(messages, local)
    return "; ".join(f"rank {r}: {m}" for r, m in enumerate(messages) if m)


def guarded(compute):
    """Run ``compute()``; an exception becomes a fault text (the rank carries on to agree with the others)."""
    try:
        return compute(), None
    except Exception as exc:  # every fault of a step: the ranks must stop together, not hang
        return None, f"{type(exc).__name__}: {exc}"


def reduce_sum(accelerator, tensor: torch.Tensor) -> torch.Tensor:
    """The sum over ranks (float64 on the CPU), the same on every rank."""
    if accelerator.num_processes == 1:
        return tensor
    return accelerator.reduce(tensor.float().to(accelerator.device), reduction="sum").cpu().double()


def agreed_requests(accelerator, requests: dict) -> dict:
    """Every rank acts on a request any rank saw: flag files are read by rank 0 only, a signal may
    reach any rank; the sum over ranks is the same everywhere."""
    if accelerator.num_processes == 1:
        return requests
    names = ("stop", "save_now", "sample_now")
    flags = accelerator.reduce(torch.tensor([float(requests[k]) for k in names]).to(accelerator.device),
                               reduction="sum").cpu()
    return {k: bool(flags[i] > 0) for i, k in enumerate(names)}


def broadcast_flags(accelerator, *flags: bool) -> list[bool]:
    """Rank 0's values of ``flags`` on every rank."""
    values = torch.tensor([float(f) for f in flags], device=accelerator.device)
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast

        values = broadcast(values, from_process=0)
    return [bool(v.item()) for v in values]


def end_process_group() -> None:
    """Destroy the process group of a launched run (WORLD_SIZE > 1) once every rank is past its last
    collective. Left to interpreter exit, gloo's worker threads may free tensors after Python is torn
    down and abort the process with SIGABRT (pytorch/pytorch#179291): a finished run would exit 1."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
