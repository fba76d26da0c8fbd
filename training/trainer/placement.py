"""Where each model of a run lives: the memory modes, chosen from the memory there is, and applied.

- ``fast``: the frozen (not trained) expert whole on each GPU (an fp8 file stays fp8 there, cast
  layer by layer); the trained expert as the DeepSpeed preset says (ZeRO-3 + offload: partitioned
  in host memory).
- ``sharded`` (two or more processes): the frozen expert under DeepSpeed ZeRO-3 as an inference
  engine, so each GPU holds 1/N of it and gathers a layer when it runs.
- ``low`` (one process, no DeepSpeed): both experts stay in host memory and stream to the GPU
  layer by layer (stream.py); on the GPU: the LoRA with its gradients and optimizer state, the
  small non-Linear weights, and the VAE and reward models only while they are used.
- ``auto``: the fastest of these that fits the free GPU and host memory (memory_estimate.py).

The experts' files are memory-mapped (safetensors), so a machine's processes share one copy of
their pages; an fp8 file stays fp8 where the expert is not handed to DeepSpeed (DeepSpeed gets
the trained expert, and in ``sharded`` the frozen one, cast to the run's dtype before it
partitions them). Results are the same in every mode: the tests compare the loss and the LoRA's
gradients of ``sharded`` and ``low`` with ``fast``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch

from .memory_estimate import (MODES, ZERO3_OFFLOAD, DeepSpeedShape, Estimate, RunSize, a14b_size,
                              estimates)

REQUESTS = ("auto",) + MODES


@dataclass
class Decision:
    mode: str
    reason: str
    estimates: dict[str, Estimate]


class PlacementError(RuntimeError):
    """The requested memory mode cannot run here; the message names the mode, the estimate, the free
    memory and the mode that would fit."""


def _fits(e: Estimate, gpu_free: float | None, host_free: float | None) -> bool:
    return (gpu_free is None or e.gpu_gib <= gpu_free) and (host_free is None or e.host_gib <= host_free)


def decide(size: RunSize, requested: str, processes: int, per_machine: int, ds: DeepSpeedShape,
           gpu_free: float | None, host_free: float | None) -> Decision:
    """The mode to run: ``requested``, or for "auto" the fastest that fits. ``gpu_free`` / ``host_free``
    in GiB (None: not checked, e.g. a CPU run). PlacementError when it cannot run."""
    options = estimates(size, processes, per_machine, ds)
    free = (f"{gpu_free:.1f} GiB free per GPU" if gpu_free is not None else "no GPU check") + \
        (f", {host_free:.1f} GiB host memory available" if host_free is not None else "")
    fitting = [m for m, e in options.items() if _fits(e, gpu_free, host_free)]
    if requested == "auto":
        if not fitting:
            raise PlacementError(f"no memory mode fits ({free}): " + "; ".join(
                f"{m} needs about {e.gpu_gib:.1f} GiB per GPU and {e.host_gib:.1f} GiB host" for m, e in options.items())
                + _advice(processes))
        mode = fitting[0]
        faster = [m for m in MODES[: MODES.index(mode)] if m in options]
        why = (f"the fastest mode that fits ({free}); " + ", ".join(
            f"{m} would need {options[m].gpu_gib:.1f} GiB per GPU and {options[m].host_gib:.1f} GiB host"
            for m in faster)) if faster else f"it fits ({free})"
        return Decision(mode, f"auto chose {mode}: {why}", options)
    if requested == "sharded" and processes < 2:
        raise PlacementError("memory mode sharded partitions the frozen expert across the processes and needs two "
                             "or more (gpus: 2 or more GPUs); with one GPU use fast or low")
    if requested == "low" and processes != 1:
        raise PlacementError(f"memory mode low streams the experts to one GPU and runs one process, not {processes}: "
                             "set gpus to one GPU, or use fast or sharded on several")
    chosen = options[requested]
    if not _fits(chosen, gpu_free, host_free):
        other = next((m for m in fitting if m != requested), None)
        raise PlacementError(f"memory mode {requested} needs about {chosen.gpu_gib:.1f} GiB per GPU and "
                             f"{chosen.host_gib:.1f} GiB host memory, but there are {free}; "
                             + (f"use {other} (about {options[other].gpu_gib:.1f} GiB per GPU, "
                                f"{options[other].host_gib:.1f} GiB host) or auto" if other else
                                "no mode fits" + _advice(processes)))
    return Decision(requested, f"{requested} as asked ({free})", options)


def _advice(processes: int) -> str:
    return ("; lower frames, width/height or rank, train on one GPU with memory mode low, or add host memory"
            if processes > 1 else "; lower frames, width/height or rank, use two or more GPUs (sharded), or add "
            "host memory")



def readme_table(size: RunSize | None = None) -> str:
    """The README's table "what trains on which GPUs", from ``estimate``."""
    size = size or a14b_size()
    lines = ["| mode | GPUs | GPU memory per GPU | host memory per machine |", "|---|---|---|---|"]
    for processes in (1, 2, 8):
        for mode, e in estimates(size, processes, processes, ZERO3_OFFLOAD).items():
            lines.append(f"| {mode} | {processes} | {e.gpu_gib:.1f} GiB | {e.host_gib:.1f} GiB |")
    lines += ["", "| GPU | 1 GPU | 2 GPUs | 8 GPUs |", "|---|---|---|---|"]
    for gib in (24, 32, 48, 80):
        row = []
        for processes in (1, 2, 8):
            try:
                row.append(decide(size, "auto", processes, processes, ZERO3_OFFLOAD, gib * 0.95, None).mode)
            except PlacementError:
                row.append("does not fit")
        lines.append(f"| {gib} GB | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def check_only_table(size: RunSize, ds: DeepSpeedShape) -> dict:
    """What ``--check-only`` reports: each mode's estimate for 1, 2 and 8 GPUs and auto's choice for
    24, 32, 48 and 80 GB GPUs."""
    table = {str(p): {m: {"gpu_gib": e.gpu_gib, "host_gib": e.host_gib} for m, e in estimates(size, p, p, ds).items()}
             for p in (1, 2, 8)}
    picks = {}
    for gib in (24, 32, 48, 80):
        for p in (1, 2, 8):
            try:
                picks[f"{gib}GB x{p}"] = decide(size, "auto", p, p, ds, gib * 0.95, None).mode
            except PlacementError:
                picks[f"{gib}GB x{p}"] = None
    return {"estimates": table, "auto": picks}



def agree(mode: str, accelerator) -> str:
    """The mode every process runs: the slowest any of them chose (their free memory may differ)."""
    if accelerator.num_processes == 1:
        return mode
    index = torch.tensor([float(MODES.index(mode))], device=accelerator.device)
    return MODES[int(accelerator.reduce(index, reduction="max").item())]


# ---- applying it ------------------------------------------------------------------------------

@dataclass
class Placement:
    """Where the models of this process live, for ``mode``; the recipe calls it while it sets up."""

    mode: str
    reason: str
    device: torch.device
    dtype: torch.dtype
    world: int = 1
    parked: list = field(default_factory=list)  # modules that go to the GPU only while used (low)

    @property
    def keeps_fp8(self) -> dict[str, bool]:
        """Whether an fp8 file stays fp8 for the frozen / trained expert (not when DeepSpeed takes it)."""
        return {"frozen": self.mode != "sharded", "trained": self.mode == "low"}

    @property
    def uses_deepspeed_for_trained(self) -> bool:
        return self.mode != "low"

    def place_frozen(self, model: torch.nn.Module, scales: dict):
        """The frozen expert, ready to run; returns what the sampler calls (a DeepSpeed engine in sharded)."""
        from .stream import Prefetcher, move_except_streamed, pin_weights, stream_linears

        model.requires_grad_(False).eval()
        if self.mode == "sharded":
            return zero3_inference_engine(model, self.world, self.dtype)
        if self.mode == "low":
            prefetcher = Prefetcher(self.device) if self.device.type == "cuda" else None
            stream_linears(model, scales, prefetcher)
            if self.device.type == "cuda":
                pin_weights(model)
            move_except_streamed(model, self.device)
            return model
        if _has_fp8(model):  # fp8 stays fp8 on the GPU, cast (and scaled) layer by layer
            stream_linears(model, scales, fp8_only=True)
        return model.to(self.device)

    def place_trained(self, model: torch.nn.Module, scales: dict) -> None:
        """Before the optimizer is built: in low, the base weights stay in host memory and stream; the
        LoRA and every small weight go to the GPU. Other modes leave it to DeepSpeed / accelerate."""
        from .stream import Prefetcher, move_except_streamed, pin_weights, stream_linears

        if self.mode != "low":
            return
        prefetcher = Prefetcher(self.device) if self.device.type == "cuda" else None
        stream_linears(model, scales, prefetcher)
        if self.device.type == "cuda":
            pin_weights(model)
        move_except_streamed(model, self.device)

    def park(self, *modules: torch.nn.Module) -> None:
        """Modules used for a moment per step (VAE, reward models): in low they wait in host memory."""
        for module in modules:
            if self.mode == "low" and self.device.type == "cuda":
                module.to("cpu")
                self.parked.append(module)
            else:
                module.to(self.device)

    def bring(self, module: torch.nn.Module) -> torch.nn.Module:
        """A parked module on the GPU (for a decode or a score and its backward)."""
        if module in self.parked:
            module.to(self.device)
        return module

    def park_all(self) -> None:
        """After the backward: the parked modules back to host memory."""
        if self.parked:
            for module in self.parked:
                module.to("cpu")
            torch.cuda.empty_cache()


def _has_fp8(model: torch.nn.Module) -> bool:
    return any(p.dtype in _FP8 for p in model.parameters())


_FP8 = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))
FROZEN_PERSISTENCE = 10_000  # frozen parameters smaller than this stay whole on every rank (biases, norms)


def zero3_inference_engine(model: torch.nn.Module, world: int, dtype: torch.dtype):
    """The frozen expert under DeepSpeed ZeRO-3 without an optimizer: each rank keeps 1/N of every
    parameter larger than FROZEN_PERSISTENCE and the engine gathers a module's parameters when it runs
    (every rank must run the same forwards, as the sampler does)."""
    import deepspeed

    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "train_batch_size": world,
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": FROZEN_PERSISTENCE,
                                    "stage3_max_live_parameters": 1e9, "stage3_prefetch_bucket_size": 5e7},
              "bf16": {"enabled": dtype == torch.bfloat16}, "fp16": {"enabled": dtype == torch.float16},
              "steps_per_print": 10 ** 9}
    engine, *_ = deepspeed.initialize(model=model.to(dtype), config=config)
    engine.eval()
    return engine


def local_fraction(model: torch.nn.Module) -> float:
    """The share of a ZeRO-3 model's values held by this rank (1.0 when it is not partitioned)."""
    local = total = 0
    for param in model.parameters():
        if hasattr(param, "ds_numel"):
            local += param.ds_tensor.numel() if not getattr(param, "ds_persist", False) else param.ds_numel
            total += param.ds_numel
        else:
            local += param.numel()
            total += param.numel()
    return local / max(total, 1)


if __name__ == "__main__":
    if sys.argv[1:] == ["--readme"]:
        sys.stdout.write(readme_table())
    else:
        sys.exit("usage: python -m training.trainer.placement --readme")
