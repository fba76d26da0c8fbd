"""The Train node's run: launch each phase's trainer, forward its events to the frontend and the
progress bar (``process.follow`` pumps them), stop it on Cancel, and publish the LoRAs."""

from __future__ import annotations

import os
from pathlib import Path

import folder_paths
import torch

from ..training.safe_io import DiskFullError, write_text
from ..training.trainer.config import TrainConfig
from ..training.trainer.curves import run_events
from ..training.trainer.failures import LaunchError, failure_message
from ..training.trainer.launcher import build_command, build_env
from ..training.trainer.phases import phase_complete
from ..training.trainer.process import RunInterrupted, TrainerProcess, follow
from ..training.trainer.publish import publish_lora
from ..training.trainer.run_request import RunPlan
from .train_inputs import TrainInputError

EVENT = "wan_reward.train"  # websocket event type (web/train_progress.js listens)


def visible_gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def memory_here(devices) -> tuple[float | None, float]:
    """(GPU GiB the trainer will have: the smallest chosen GPU's total, as ComfyUI unloads its models
    before a GPU run, less a margin; host GiB available). None for the GPU on a CPU run."""
    import psutil

    host = psutil.virtual_memory().available / 2 ** 30
    if devices.cpu:
        return None, host
    totals = [torch.cuda.get_device_properties(int(i)).total_memory for i in devices.gpu_ids]
    return min(totals) / 2 ** 30 * 0.92, host


def _view_ref(path: str) -> dict | None:
    """A file under ComfyUI's output folder as the reference /view serves."""
    base = os.path.realpath(folder_paths.get_output_directory())
    full = os.path.realpath(path)
    if os.path.commonpath([base, full]) != base:
        return None
    subfolder = os.path.relpath(os.path.dirname(full), base)
    return {"filename": os.path.basename(full), "subfolder": "" if subfolder == "." else subfolder, "type": "output"}


def send(event: dict, node_id, prompt_id, phase: str | None = None) -> None:
    from server import PromptServer

    from ..training.trainer.progress import EVENTS, NODE_EVENTS

    name = event.get("event")
    fields = {**EVENTS, **NODE_EVENTS}.get(name, {})
    data = {"node": node_id, "prompt_id": prompt_id, "event": name, "phase": phase}
    data.update({k: event[k] for k in fields if k in event})
    if name == "sample":  # the decoded frames, as the frontend fetches them
        data["images"] = [ref for ref in map(_view_ref, event.get("paths", [])) if ref]
    PromptServer.instance.send_sync(EVENT, data)


def current_prompt_id():
    try:
        from comfy_execution.utils import get_executing_context

        context = get_executing_context()
        return context.prompt_id if context else None
    except Exception:  # older ComfyUI: the frontend matches on the node id alone
        return None


def lora_target(stem: str) -> Path:
    return Path(folder_paths.get_folder_paths("loras")[0]) / f"{stem}.safetensors"


def lora_targets(name: str, phase: TrainConfig, whole: TrainConfig) -> list[Path]:
    """Where a phase's LoRA and best LoRA go in the loras folder."""
    stem = phase.output_name
    best = f"{name}_best" if whole.expert != "both" else f"{name}_best_{phase.expert}_noise"
    return [lora_target(stem), lora_target(best)]


def run_phases(plan: RunPlan, phases: list[TrainConfig], devices, preset: str, node_id) -> list[list[dict]]:
    import comfy.model_management as mm
    import comfy.utils

    prompt_id = current_prompt_id()
    total = sum(p.max_steps for p in phases)
    bar = comfy.utils.ProgressBar(max(total, 1), node_id=node_id)
    histories = []
    unloaded = False
    for offset_index, phase in enumerate(phases):
        offset = sum(p.max_steps for p in phases[:offset_index])
        label = phase.expert if len(phases) > 1 else None
        send({"event": "plan", "text": plan.summary() + (f"\nphase: {label}-noise LoRA" if label else "")},
              node_id, prompt_id, label)
        if len(phases) > 1 and phase_complete(phase):  # trained by an earlier queue: go on with the next
            histories.append(run_events(phase.output_dir))
            continue
        config_path = Path(phase.output_dir) / "run.yaml"
        write_text(config_path, plan.yaml_for(phase))
        try:
            command = build_command(config_path, devices, preset=preset)
        except LaunchError as exc:
            raise TrainInputError(str(exc)) from None
        if not devices.cpu and not unloaded:
            mm.unload_all_models()  # the trainer needs the GPU memory ComfyUI holds
            mm.soft_empty_cache(True)
            unloaded = True
        process = TrainerProcess(command, build_env(devices), phase.output_dir).start()

        def report(event: dict, offset=offset, label=label) -> None:
            send(event, node_id, prompt_id, label)
            if event["event"] in ("started", "step") and event.get("max_steps"):
                bar.update_absolute(offset + int(event.get("step", 0)), max(total, 1))

        try:
            result = follow(process, report, mm.processing_interrupted)
        except RunInterrupted as stopped:
            send({"event": "cancelled", "message": f"{stopped}; queue again with resume on to continue from "
                   "the last checkpoint"}, node_id, prompt_id, label)
            raise mm.InterruptProcessingException() from None
        if result.returncode != 0 or result.finished is None:
            raise RuntimeError(failure_message(result, visible_gpus=visible_gpus()))
        histories.append(run_events(phase.output_dir, result.events))
    return histories


def publish_phase(run_dir: Path, name: str, phase: TrainConfig, whole: TrainConfig,
                  history: list[dict]) -> tuple[str, str, int]:
    """Copy a phase's LoRA (and its best LoRA) into the loras folder, atomically; returns their names
    in the list and the best step."""
    finished = next((e for e in reversed(history) if e.get("event") == "finished"), {})
    source = Path(finished.get("lora_path") or phase.lora_path)
    if not source.is_file():
        raise RuntimeError(f"the trainer finished but its LoRA {source} is missing; see "
                           f"{Path(phase.output_dir) / 'train.log'}")
    target, best_target = lora_targets(name, phase, whole)
    try:
        publish_lora(source, target, run_dir)
        validations = [e for e in history if e.get("event") == "validation"]
        best_path = finished.get("best_lora_path")
        if best_path and Path(best_path).is_file():
            publish_lora(best_path, best_target, run_dir)
            best_name, best_step = best_target.name, int(validations[-1]["best_step"]) if validations else -1
        elif validations:  # the base model scored best: no LoRA
            best_name, best_step = "None", 0
        else:  # no validation: the last LoRA
            best_name, best_step = target.name, int(finished.get("step", phase.max_steps))
    except (LaunchError, DiskFullError) as exc:
        raise RuntimeError(f"{exc} (the trained LoRA is kept at {source})") from None
    return target.name, best_name, best_step
