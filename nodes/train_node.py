"""Reward LoRA Train: writes the trainer's config, runs the trainer as a subprocess, reports progress.

The trainer is its own program (training/train_reward_lora.py under accelerate), started by
training/trainer/launcher.py in its own process group; ComfyUI is never relaunched per rank.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import folder_paths
import torch
from comfy_api.latest import io, ui

from ..training.safe_io import DiskFullError, UserFileError, write_text
from ..training.rewards.registry import checkpoint_kind
from ..training.trainer.config import ConfigError, TrainConfig, config_from_dict, dump_config
from ..training.trainer.curves import final_scores_text, plot_training_curve, run_events
from ..training.trainer.launcher import (PRESETS, DeviceLock, LaunchError, TrainerProcess, build_command, build_env,
                                         check_publish_target, failure_message, interrupted_run_notice,
                                         parse_devices, publish_lora, run_lock)
from .folders import REWARD_MODELS

CATEGORY = "Wan Reward LoRA/training"
EVENT = "wan_reward.train"  # websocket event type (web/train_progress.js listens)
RUNS_FOLDER = "wan_reward_lora"  # under ComfyUI's output folder: one run folder per output name
NONE = "none"
# The LoRA name output has the combo type, so it links into a loader's lora dropdown (V1 packs return
# the file list as the type for the same reason; V3 combo inputs check for "COMBO").
LoraNameType = io.Custom("COMBO")
STOP_GRACE_S = 300.0  # after Cancel: time for the trainer to finish its step and save before SIGTERM
TERM_GRACE_S = 20.0  # after SIGTERM: time before SIGKILL
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._ -]{0,119}$")
_SENT_FIELDS = ("step", "max_steps", "loss", "reward", "rewards", "eta_seconds", "seconds", "lr", "reason",
                "message", "held_out", "motion", "lora_path", "world_size")


class TrainInputError(ValueError):
    """A node input is wrong; the message names it."""


def safe_output_name(name: str) -> str:
    """The LoRA file stem: a plain name (no folders, no '..'); a trailing .safetensors is dropped."""
    stem = (name or "").strip()
    if stem.lower().endswith(".safetensors"):
        stem = stem[: -len(".safetensors")]
    if not _NAME.match(stem) or ".." in stem:
        raise TrainInputError(f"output_name {name!r}: use a plain file name (letters, digits, '.', '_', '-', "
                              "space; no folders, no '..'); the LoRA is written to ComfyUI's loras folder")
    return stem


def input_file(name: str, what: str) -> str:
    """A file in ComfyUI's input folder (subfolders allowed, nothing outside it)."""
    base = os.path.realpath(folder_paths.get_input_directory())
    path = os.path.realpath(os.path.join(base, name.strip()))
    if os.path.commonpath([base, path]) != base:
        raise TrainInputError(f"{what} {name!r}: give a file inside ComfyUI's input folder ({base})")
    if not os.path.isfile(path):
        raise TrainInputError(f"{what} {name!r}: file not found in ComfyUI's input folder ({base})")
    return path


# Config fields the node's inputs set, by the input's name (errors name the input the user sees).
FIELD_INPUTS = {"rewards[0]": "reward_model", "rewards[1]": "reward_model_2", "lora_rank": "rank",
                "lora_alpha": "alpha", "max_steps": "steps", "prompts": "prompts", "prompts_file": "prompts_file",
                "prompt_embeddings": "clip / prompt_embeddings", "text_encoder": "clip", "tokenizer": "clip"}


def input_error(exc: ConfigError) -> TrainInputError:
    """A config error as the node's: it names the node input, then the config field's message."""
    field_name = exc.field or ""
    base = field_name.split(".")[0]
    name = FIELD_INPUTS.get(base, FIELD_INPUTS.get(field_name, base))
    return TrainInputError(f"input '{name}': {exc}")


def model_file(folder: str, name: str, input_name: str) -> str:
    """The full path of a file of a ComfyUI model folder, or an error naming the input and the folders."""
    path = folder_paths.get_full_path(folder, name)
    if path is None:
        places = ", ".join(folder_paths.get_folder_paths(folder))
        raise TrainInputError(f"input '{input_name}': {name!r} is not in the {folder} folder ({places}); put the "
                              "file there and press R to refresh the list")
    return path


def prompt_lines(text: str) -> list[str]:
    return [line.strip() for line in (text or "").splitlines() if line.strip()]


def encode_prompts(clip, prompts: list[str]) -> dict[str, torch.Tensor]:
    """umT5 embeddings of each prompt with ComfyUI's loaded CLIP, cut to the prompt's tokens ([L, 4096]).

    ComfyUI pads umT5 to 512 tokens with zeros (pad id 0); the trainer pads itself, so the
    padding is cut off here.
    """
    out = {}
    for prompt in prompts:
        tokens = clip.tokenize(prompt)
        cond = clip.encode_from_tokens(tokens)
        batches = next(iter(tokens.values()))
        length = sum(1 for batch in batches for tok in batch if int(tok[0]) != 0) or 1
        out[prompt] = cond[0, :length].float().cpu().contiguous()
    return out


def _visible_gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _send(event: dict, node_id, prompt_id) -> None:
    from server import PromptServer

    data = {"node": node_id, "prompt_id": prompt_id, "event": event.get("event")}
    data.update({k: event[k] for k in _SENT_FIELDS if k in event})
    PromptServer.instance.send_sync(EVENT, data)


class WanRewardLoraTrain(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        experts = folder_paths.get_filename_list("diffusion_models")
        rewards = folder_paths.get_filename_list(REWARD_MODELS)
        return io.Schema(
            node_id="WanRewardLoraTrain",
            display_name="Reward LoRA Train",
            category=CATEGORY,
            description=(
                "Trains a reward LoRA for one Wan2.2 expert by reward backpropagation (HPS v2.1 / MPS), "
                "running the trainer as its own program (accelerate + DeepSpeed). Cancel stops it after a "
                "checkpoint; queue again with resume on to continue. The LoRA is saved to the loras folder."),
            inputs=[
                io.Combo.Input("high_noise_model", options=experts,
                               tooltip="High-noise expert (diffusion_models folder)."),
                io.Combo.Input("low_noise_model", options=experts,
                               tooltip="Low-noise expert (diffusion_models folder). Both experts are needed."),
                io.Combo.Input("vae", options=folder_paths.get_filename_list("vae"), tooltip="Wan2.1 VAE."),
                io.Combo.Input("reward_model", options=rewards,
                               tooltip="HPS v2.1 or MPS checkpoint (reward_models folder)."),
                io.Float.Input("reward_weight", default=1.0, min=0.0, max=100.0, step=0.05),
                io.String.Input("prompts", multiline=True, default="",
                                tooltip="Training prompts, one per line (or prompts_file)."),
                io.Combo.Input("expert", options=["low", "high"], default="low",
                               tooltip="Which expert's LoRA to train."),
                io.Int.Input("rank", default=128, min=1, max=1024),
                io.Float.Input("alpha", default=64.0, min=0.01, max=4096.0, step=0.5),
                io.Int.Input("steps", default=1000, min=1, max=1000000, tooltip="Optimizer steps in all."),
                io.Float.Input("learning_rate", default=1e-5, min=1e-8, max=0.5, step=1e-6, round=False),
                io.Int.Input("width", default=256, min=16, max=2048, step=16),
                io.Int.Input("height", default=256, min=16, max=2048, step=16),
                io.Int.Input("frames", default=81, min=1, max=1001, step=4, tooltip="4k+1 frames per video."),
                io.Int.Input("backprop_steps", default=1, min=1, max=100,
                             tooltip="Backprop window: the last K denoising steps of the expert get gradients."),
                io.String.Input("gpus", default="auto",
                                tooltip="auto (every visible GPU), a count (2), ids (0,1), or cpu[:N]."),
                io.Combo.Input("deepspeed", options=list(PRESETS), default="zero3_offload",
                               tooltip="zero3_offload: ZeRO-3 with CPU offload (least GPU memory); zero3; zero2; "
                                       "none: plain data parallel."),
                io.String.Input("output_name", default="wan_reward_lora",
                                tooltip="LoRA file name in the loras folder (no folders)."),
                io.Boolean.Input("resume", default=True,
                                 tooltip="Continue from the last checkpoint of the run with this output name."),
                io.Clip.Input("clip", optional=True,
                              tooltip="The loaded umt5 text encoder: prompts are encoded here, once."),
                io.String.Input("prompt_embeddings", default="", optional=True,
                                tooltip="Instead of clip: a precomputed embeddings .safetensors in the input folder."),
                io.String.Input("prompts_file", default="", optional=True,
                                tooltip="A text file in the input folder, one prompt per line."),
                io.Combo.Input("reward_model_2", options=[NONE] + rewards, default=NONE, optional=True),
                io.Float.Input("reward_weight_2", default=1.0, min=0.0, max=100.0, step=0.05, optional=True),
                io.Int.Input("inference_steps", default=40, min=2, max=200, optional=True),
                io.Float.Input("guidance_scale", default=6.0, min=1.0, max=30.0, step=0.1, optional=True),
                io.Float.Input("shift", default=5.0, min=0.1, max=30.0, step=0.1, optional=True),
                io.Float.Input("boundary", default=0.9, min=0.01, max=0.99, step=0.005, optional=True,
                               tooltip="Expert switch: 0.875 text-to-video, 0.9 image-to-video / Fun InP."),
                io.Int.Input("seed", default=42, min=0, max=2 ** 31 - 1, optional=True, control_after_generate=False,
                             tooltip="Training seed (fixed: a resumed run keeps it)."),
                io.Int.Input("checkpoint_every", default=100, min=0, max=100000, optional=True),
            ],
            outputs=[
                LoraNameType.Output("lora_name", display_name="lora_name",
                                    tooltip="The trained LoRA's name in the loras folder; link it to a LoRA loader's "
                                            "lora widget."),
                io.Image.Output("reward_curve", display_name="reward_curve"),
                io.String.Output("scores", display_name="scores"),
            ],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, high_noise_model, low_noise_model, vae, reward_model, reward_weight, prompts, expert, rank,
                alpha, steps, learning_rate, width, height, frames, backprop_steps, gpus, deepspeed, output_name,
                resume, clip=None, prompt_embeddings="", prompts_file="", reward_model_2=NONE, reward_weight_2=1.0,
                inference_steps=40, guidance_scale=6.0, shift=5.0, boundary=0.9, seed=42,
                checkpoint_every=100) -> io.NodeOutput:
        name = safe_output_name(output_name)
        try:
            devices = parse_devices(gpus, _visible_gpus())
            lock_keys, lock_names = devices.lock_keys, devices.lock_names()  # physical GPU ids
        except LaunchError as exc:
            raise TrainInputError(str(exc)) from None
        args = dict(locals())
        run_dir = Path(folder_paths.get_output_directory()) / RUNS_FOLDER / name
        owner = f"ComfyUI node {cls.hidden.unique_id}, output {name!r}"
        device_lock = DeviceLock(lock_keys, owner=owner, names=lock_names)
        folder_lock = run_lock(run_dir.parent, name, owner=owner)  # one run per run folder, too
        try:
            device_lock.acquire()
            try:
                folder_lock.acquire()
            except LaunchError:
                device_lock.release()
                raise
        except LaunchError as exc:
            raise RuntimeError(str(exc)) from None
        try:  # the run folder is written only while its lock is held
            try:  # a trainer a dead ComfyUI left running is never trained over
                notice = interrupted_run_notice(run_dir, folder_lock.previous.get(name), bool(resume))
            except LaunchError as exc:
                raise RuntimeError(str(exc)) from None
            if notice:
                logging.warning("Reward LoRA Train: %s", notice)
                _send({"event": "warning", "message": notice}, cls.hidden.unique_id, _current_prompt_id())
            run_dir.mkdir(parents=True, exist_ok=True)
            config = cls._config(args, name, run_dir, devices)
            try:  # before hours of training: the target must be absent or this run's own LoRA
                check_publish_target(cls._lora_target(name), run_dir, config.config_hash())
            except LaunchError as exc:
                raise TrainInputError(str(exc)) from None
            events = cls._run(config, run_dir, devices, deepspeed)
        finally:
            folder_lock.release()
            device_lock.release()
        lora_name = cls._publish(run_dir, name, events)
        history = run_events(run_dir, events)  # all steps of the run, earlier launches (before a resume) too
        curve = plot_training_curve(history)
        scores = final_scores_text(history)
        return io.NodeOutput(lora_name, curve, scores,
                             ui={"text": (scores,), **ui.PreviewImage(curve, cls=cls).as_dict()})

    # ---- config ---------------------------------------------------------------------------
    @classmethod
    def _config(cls, args: dict, name: str, run_dir: Path, devices) -> TrainConfig:
        rewards = [(args["reward_model"], args["reward_weight"])]
        if args["reward_model_2"] and args["reward_model_2"] != NONE:
            rewards.append((args["reward_model_2"], args["reward_weight_2"]))
        reward_specs = []
        for file_name, weight in rewards:
            slot = "reward_model" if not reward_specs else "reward_model_2"
            path = model_file(REWARD_MODELS, file_name, slot)
            try:  # the kind from the file's keys, never its name
                kind = checkpoint_kind(path)
            except UserFileError as exc:
                raise TrainInputError(f"input '{slot}' ({file_name}): {exc}") from None
            reward_specs.append({"model": kind, "path": path, "weight": float(weight)})
        prompts = prompt_lines(args["prompts"])
        prompts_file = (args["prompts_file"] or "").strip()
        if prompts and prompts_file:
            raise TrainInputError("give the prompts either in 'prompts' or in 'prompts_file', not both")
        if prompts_file:
            from ..training.trainer.config import read_prompt_file

            prompts = read_prompt_file(input_file(prompts_file, "prompts_file"), "prompts_file")
        config = dict(
            high_noise_model=model_file("diffusion_models", args["high_noise_model"], "high_noise_model"),
            low_noise_model=model_file("diffusion_models", args["low_noise_model"], "low_noise_model"),
            vae=model_file("vae", args["vae"], "vae"),
            expert=args["expert"], base_model_name=f"{args['high_noise_model']} + {args['low_noise_model']}",
            rewards=reward_specs, lora_rank=int(args["rank"]), lora_alpha=float(args["alpha"]),
            learning_rate=float(args["learning_rate"]), max_steps=int(args["steps"]),
            height=int(args["height"]), width=int(args["width"]), frames=int(args["frames"]),
            backprop_steps=int(args["backprop_steps"]), inference_steps=int(args["inference_steps"]),
            guidance_scale=float(args["guidance_scale"]), shift=float(args["shift"]),
            boundary=float(args["boundary"]), seed=int(args["seed"]),
            checkpoint_every=int(args["checkpoint_every"]), resume=bool(args["resume"]),
            mixed_precision="no" if devices.cpu else "bf16",
            gradient_checkpointing=not devices.cpu,
            output_dir=str(run_dir), output_name=name,
        )
        clip, embeddings = args["clip"], (args["prompt_embeddings"] or "").strip()
        if clip is not None:
            if not prompts:
                raise TrainInputError("input 'prompts' is empty: write the training prompts, one per line")
            from ..training.trainer.models import write_prompt_embeddings

            negative = "" if float(args["guidance_scale"]) > 1 else None
            todo = list(dict.fromkeys(prompts + ([negative] if negative is not None else [])))
            path = run_dir / "prompt_embeddings.safetensors"
            write_prompt_embeddings(path, encode_prompts(clip, todo))
            config["prompt_embeddings"] = str(path)
        elif embeddings:
            config["prompt_embeddings"] = input_file(embeddings, "prompt_embeddings")
        else:
            raise TrainInputError("connect the umt5 text encoder to 'clip' (CLIPLoader, type wan), or give "
                                  "'prompt_embeddings': a precomputed embeddings file in the input folder")
        if prompts:
            config["prompts"] = prompts
        try:  # every value and every file's contents, before anything is unloaded or launched
            return config_from_dict(config)
        except ConfigError as exc:
            raise input_error(exc) from None

    # ---- the run --------------------------------------------------------------------------
    @classmethod
    def _run(cls, config: TrainConfig, run_dir: Path, devices, preset: str) -> list[dict]:
        import comfy.model_management as mm
        import comfy.utils

        config_path = run_dir / "run.yaml"
        write_text(config_path, dump_config(config))
        try:
            command = build_command(config_path, devices, preset=preset)
        except LaunchError as exc:
            raise TrainInputError(str(exc)) from None
        if not devices.cpu:
            mm.unload_all_models()  # the trainer needs the GPU memory ComfyUI holds
            mm.soft_empty_cache(True)
        node_id = cls.hidden.unique_id
        prompt_id = _current_prompt_id()
        process = TrainerProcess(command, build_env(devices, threads=devices.cpu_threads()), run_dir).start()
        bar = comfy.utils.ProgressBar(config.max_steps, node_id=node_id)

        def report(event: dict) -> None:
            _send(event, node_id, prompt_id)
            if event["event"] in ("started", "step") and event.get("max_steps"):
                bar.update_absolute(int(event.get("step", 0)), int(event["max_steps"]))

        try:
            while True:
                if mm.processing_interrupted():
                    raise mm.InterruptProcessingException()
                event = process.next_event(timeout=0.5)
                if event is not None:
                    report(event)
                elif process.poll() is not None:
                    process.wait(timeout=30)  # joins the reader: every line of the stream is queued
                    for event in process.drain():  # the last events, none dropped
                        report(event)
                    break
        except BaseException:
            started = any(e.get("event") == "started" for e in process.events)
            # still loading models: nothing to save, so no grace before SIGTERM
            code = process.stop(grace_s=STOP_GRACE_S if started else 0.0, kill_s=TERM_GRACE_S)
            _send({"event": "cancelled", "message": f"stopped (exit code {code}); queue again with resume on "
                   "to continue from the last checkpoint"}, node_id, prompt_id)
            raise
        code = process.wait(timeout=30)
        if process.group_alive():  # the launcher exited but left processes: end them
            process.stop(grace_s=0.0, kill_s=TERM_GRACE_S)
        result = process.result()
        if code != 0 or result.finished is None:
            raise RuntimeError(failure_message(result, visible_gpus=_visible_gpus()))
        return result.events

    @classmethod
    def _publish(cls, run_dir: Path, name: str, events: list[dict]) -> str:
        """Copy the run's LoRA into the loras folder (atomically); returns its name in the list."""
        finished = next(e for e in reversed(events) if e.get("event") == "finished")
        source = Path(finished.get("lora_path") or run_dir / f"{name}.safetensors")
        if not source.is_file():
            raise RuntimeError(f"the trainer finished but its LoRA {source} is missing; see {run_dir / 'train.log'}")
        try:
            publish_lora(source, cls._lora_target(name), run_dir)
        except (LaunchError, DiskFullError) as exc:
            raise RuntimeError(f"{exc} (the trained LoRA is kept at {source})") from None
        return f"{name}.safetensors"

    @staticmethod
    def _lora_target(name: str) -> Path:
        return Path(folder_paths.get_folder_paths("loras")[0]) / f"{name}.safetensors"


def _current_prompt_id():
    try:
        from comfy_execution.utils import get_executing_context

        context = get_executing_context()
        return context.prompt_id if context else None
    except Exception:  # older ComfyUI: the frontend matches on the node id alone
        return None


NODES = [WanRewardLoraTrain]
