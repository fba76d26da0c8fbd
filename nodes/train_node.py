"""Reward LoRA Train: runs the reward-backprop trainer as a subprocess and reports its progress.

The node resolves its inputs to files (ComfyUI's folders, its loaded text encoder, its images),
hands them to ``training.trainer.run_request.plan_run`` (which builds and checks the run), then
starts the trainer (``accelerate launch ... training/train_reward_lora.py``) through
``training.trainer.launcher`` and follows it with ``training.trainer.supervise``. ComfyUI is
never relaunched per rank.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import folder_paths
import torch
from comfy_api.latest import io, ui

from ..training.safe_io import DiskFullError, save_safetensors, write_text
from ..training.trainer.config import ConfigError, TrainConfig, spec
from ..training.trainer.curves import concat_phases, final_scores, plot_training_curve, run_events
from ..training.trainer.launcher import (PRESETS, DeviceLock, LaunchError, TrainerProcess, build_command, build_env,
                                         check_publish_target, failure_message, interrupted_run_notice, parse_devices,
                                         publish_lora, run_lock)
from ..training.trainer.phases import phase_complete, phase_configs
from ..training.trainer.recipes import RECIPES
from ..training.trainer.placement import REQUESTS, PlacementError
from ..training.trainer.run_request import FROM_RECIPE, RewardChoice, RunPlan, TrainRequest, choose_memory, plan_run
from ..training.trainer.supervise import RunInterrupted, follow
from .config_inputs import float_input, int_input
from .folders import REWARD_MODELS
from .train_options import PREPROCESS, VARIANTS, TrainOptionsType

CATEGORY = "Wan Reward LoRA/training"
EVENT = "wan_reward.train"  # websocket event type (web/train_progress.js listens)
RUNS_FOLDER = "wan_reward_lora"  # under ComfyUI's output folder: one run folder per output name
NONE = "none"
# The LoRA name outputs have the combo type, so they link into a loader's lora dropdown (V1 packs return
# the file list as the type for the same reason; V3 combo inputs check for "COMBO").
LoraNameType = io.Custom("COMBO")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._ -]{0,119}$")
RECOMMENDED = RECIPES["recommended"]
# Config fields the node's inputs set, by the input's name (errors name the input the user sees).
FIELD_INPUTS = {"rewards[0]": "reward_model", "rewards[1]": "reward_model_2", "held_out_rewards[0]": "held_out_reward",
                "held_out_rewards[1]": "held_out_reward_2", "lora_rank": "rank", "lora_alpha": "alpha",
                "max_steps": "steps", "prompts": "prompts", "prompts_file": "prompts_file",
                "gradient_accumulation_steps": "gradient_accumulation",
                "prompt_embeddings": "clip / prompt_embeddings", "text_encoder": "clip", "tokenizer": "clip",
                "validation_prompts": "options: validation_prompts", "validation_every": "options: validation_every",
                "validation_start_images": "options: validation_start_images", "start_images": "start_images"}


class TrainInputError(ValueError):
    """A node input is wrong; the message names it."""


def input_error(exc: ConfigError) -> TrainInputError:
    """A config error as the node's: it names the node input, then the config field's message."""
    field_name = exc.field or ""
    base = field_name.split(".")[0]
    name = FIELD_INPUTS.get(base, FIELD_INPUTS.get(field_name, base))
    return TrainInputError(f"input '{name}': {exc}")


def safe_output_name(name: str) -> str:
    """The LoRA file stem: a plain name (no folders, no '..'); a trailing .safetensors is dropped."""
    stem = (name or "").strip()
    if stem.lower().endswith(".safetensors"):
        stem = stem[: -len(".safetensors")]
    if not _NAME.match(stem) or ".." in stem:
        raise TrainInputError(f"output_name {name!r}: use a plain file name (letters, digits, '.', '_', '-', "
                              "space; no folders, no '..'); the LoRA is written to ComfyUI's loras folder")
    return stem


def input_path(name: str, what: str, folder: bool = False) -> str:
    """A file (or folder) in ComfyUI's input folder (subfolders allowed, nothing outside it)."""
    base = os.path.realpath(folder_paths.get_input_directory())
    path = os.path.realpath(os.path.join(base, name.strip()))
    if os.path.commonpath([base, path]) != base:
        raise TrainInputError(f"{what} {name!r}: give a {'folder' if folder else 'file'} inside ComfyUI's input "
                              f"folder ({base})")
    if not (os.path.isdir(path) if folder else os.path.isfile(path)):
        raise TrainInputError(f"{what} {name!r}: {'folder' if folder else 'file'} not found in ComfyUI's input "
                              f"folder ({base})")
    return path


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


def save_images(images: torch.Tensor, path: Path, input_name: str) -> str:
    """A ComfyUI IMAGE batch [N, H, W, C] as the trainer's start-images file ([N, 3, H, W] in [0, 1])."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[-1] not in (3, 4):
        raise TrainInputError(f"input '{input_name}': expected an IMAGE batch [N, height, width, 3] (ComfyUI's "
                              f"layout), got {tuple(getattr(images, 'shape', ()))}")
    save_safetensors({"images": images[..., :3].permute(0, 3, 1, 2).float().clamp(0, 1).contiguous()}, path)
    return str(path)


def _memory_here(devices) -> tuple[float | None, float]:
    """(GPU GiB the trainer will have: the smallest chosen GPU's total, as ComfyUI unloads its models
    before a GPU run, less a margin; host GiB available). None for the GPU on a CPU run."""
    import psutil

    host = psutil.virtual_memory().available / 2 ** 30
    if devices.cpu:
        return None, host
    totals = [torch.cuda.get_device_properties(int(i)).total_memory for i in devices.gpu_ids]
    return min(totals) / 2 ** 30 * 0.92, host


def _visible_gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _view_ref(path: str) -> dict | None:
    """A file under ComfyUI's output folder as the reference /view serves."""
    base = os.path.realpath(folder_paths.get_output_directory())
    full = os.path.realpath(path)
    if os.path.commonpath([base, full]) != base:
        return None
    subfolder = os.path.relpath(os.path.dirname(full), base)
    return {"filename": os.path.basename(full), "subfolder": "" if subfolder == "." else subfolder, "type": "output"}


def _send(event: dict, node_id, prompt_id, phase: str | None = None) -> None:
    from server import PromptServer

    from ..training.trainer.progress import EVENTS, NODE_EVENTS

    name = event.get("event")
    fields = {**EVENTS, **NODE_EVENTS}.get(name, {})
    data = {"node": node_id, "prompt_id": prompt_id, "event": name, "phase": phase}
    data.update({k: event[k] for k in fields if k in event})
    if name == "sample":  # the decoded frames, as the frontend fetches them
        data["images"] = [ref for ref in map(_view_ref, event.get("paths", [])) if ref]
    PromptServer.instance.send_sync(EVENT, data)


def _current_prompt_id():
    try:
        from comfy_execution.utils import get_executing_context

        context = get_executing_context()
        return context.prompt_id if context else None
    except Exception:  # older ComfyUI: the frontend matches on the node id alone
        return None


def _reward_inputs(suffix: str, optional: bool, rewards: list[str]) -> list:
    """The reward file and its weight (a second reward is optional)."""
    extra = dict(optional=True, default=NONE) if optional else {}
    return [
        io.Combo.Input("reward_model" + suffix, options=([NONE] if optional else []) + rewards,
                       tooltip="HPS v2.1 or MPS checkpoint (reward_models folder); the kind is read from its keys",
                       **extra),
        io.Float.Input("reward_weight" + suffix, default=1.0, min=0.0, max=100.0, step=0.05, optional=optional,
                       tooltip="loss = sum_i w_i (1 - reward_i) / sum_i w_i"),
    ]


class WanRewardLoraTrain(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        experts = folder_paths.get_filename_list("diffusion_models")
        rewards = folder_paths.get_filename_list(REWARD_MODELS)
        loras = [NONE] + folder_paths.get_filename_list("loras")
        recipe = spec("recipe")
        return io.Schema(
            node_id="WanRewardLoraTrain",
            display_name="Reward LoRA Train",
            category=CATEGORY,
            description=(
                "Trains a reward LoRA for Wan2.2 experts by reward backpropagation (HPS v2.1 / MPS), running the "
                "trainer as its own program (accelerate + DeepSpeed). Choose a recipe (the reference's two runs or "
                "ours); the inputs are set on top of it and the node lists what differs. Cancel stops it after a "
                "checkpoint; queue again with resume on to continue. The LoRA is saved to the loras folder."),
            inputs=[
                io.Combo.Input("high_noise_model", options=experts,
                               tooltip="High-noise expert (diffusion_models folder)."),
                io.Combo.Input("low_noise_model", options=experts,
                               tooltip="Low-noise expert (diffusion_models folder). Both experts are needed."),
                io.Combo.Input("vae", options=folder_paths.get_filename_list("vae"), tooltip="Wan2.1 VAE."),
                *_reward_inputs("", False, rewards),
                io.String.Input("prompts", multiline=True, default="",
                                tooltip="Training prompts, one per line (or prompts_file)."),
                io.Combo.Input("expert", options=[FROM_RECIPE, "low", "high", "both"], default=FROM_RECIPE,
                               tooltip="Which expert's LoRA to train (recipe: the recipe's); both: the high-noise "
                                       "LoRA, then the low-noise LoRA sampling with it, published as a pair."),
                int_input("rank", "lora_rank", value=RECOMMENDED["lora_rank"]),
                float_input("alpha", "lora_alpha", value=RECOMMENDED["lora_alpha"], step=0.5),
                int_input("steps", "max_steps", value=RECOMMENDED["max_steps"]),
                float_input("learning_rate", "learning_rate", value=RECOMMENDED["learning_rate"], step=1e-6,
                            round=False),
                io.Int.Input("width", default=RECOMMENDED["width"], min=16, max=2048, step=16),
                io.Int.Input("height", default=RECOMMENDED["height"], min=16, max=2048, step=16),
                io.Int.Input("frames", default=RECOMMENDED["frames"], min=1, max=1001, step=4,
                             tooltip="4k+1 frames per video."),
                int_input("backprop_steps", "backprop_steps", value=RECOMMENDED["backprop_steps"]),
                io.String.Input("gpus", default="auto",
                                tooltip="auto (every visible GPU), a count (2), ids (0,1), or cpu[:N]."),
                io.Combo.Input("deepspeed", options=list(PRESETS), default="zero3_offload",
                               tooltip="zero3_offload: ZeRO-3 with CPU offload (least GPU memory); zero3; zero2; "
                                       "none: plain data parallel."),
                io.String.Input("output_name", default="wan_reward_lora",
                                tooltip="LoRA file name in the loras folder (no folders)."),
                io.Boolean.Input("resume", default=True,
                                 tooltip="Continue from the last checkpoint of the run with this output name."),
                io.Combo.Input("memory", options=list(REQUESTS), default="auto", optional=True,
                               tooltip="Where the models live: fast (the frozen expert whole on each GPU), sharded (it "
                                       "too split across the GPUs), low (one 24 GB-class GPU: both experts stream "
                                       "from host memory), auto (the fastest that fits). See docs/memory.md."),
                io.Combo.Input("recipe", options=list(recipe.choices), default="recommended", optional=True,
                               tooltip="recommended: ours (real clipping 0.3, batch 8 by accumulation). "
                                       "videox_fun_low_hps / videox_fun_high_mps: the reference's two runs exactly. "
                                       "The inputs are set on top of it; the node lists what differs."),
                int_input("batch_size", "batch_size", value=RECOMMENDED["batch_size"], optional=True),
                int_input("gradient_accumulation", "gradient_accumulation_steps",
                          value=RECOMMENDED["gradient_accumulation_steps"], optional=True,
                          tooltip="micro-steps per optimizer step; 0 = form the recipe's batch (8) from batch_size "
                                  "x processes"),
                TrainOptionsType.Input("options", optional=True,
                                       tooltip="Reward LoRA Train Options: validation, held-out rewards, gaming guard, "
                                               "samples, averaging, motion term."),
                io.Clip.Input("clip", optional=True,
                              tooltip="The loaded umt5 text encoder: prompts are encoded here, once."),
                io.String.Input("prompt_embeddings", default="", optional=True,
                                tooltip="Instead of clip: a precomputed embeddings .safetensors in the input folder."),
                io.String.Input("prompts_file", default="", optional=True,
                                tooltip="A text file in the input folder, one prompt per line."),
                io.Combo.Input("reward_variant", options=list(VARIANTS), default=FROM_RECIPE, optional=True,
                               tooltip="MPS only: official (~100 x cosine) or videox_fun (the reference's plain cosine)"),
                io.Combo.Input("reward_preprocess", options=list(PREPROCESS), default=FROM_RECIPE, optional=True,
                               tooltip="reference: the model's own resize; squash: the reference trainer's 224x224 "
                                       "stretch (equal for square frames)"),
                *_reward_inputs("_2", True, rewards),
                io.Combo.Input("reward_variant_2", options=list(VARIANTS), default=FROM_RECIPE, optional=True),
                io.Combo.Input("reward_preprocess_2", options=list(PREPROCESS), default=FROM_RECIPE, optional=True),
                io.Combo.Input("init_lora", options=loras, default=NONE, optional=True,
                               tooltip="Continue training this LoRA (any key format the loader reads): its rank and "
                                       "alpha are used (rank must match), its modules must be the targets."),
                io.Image.Input("start_images", optional=True,
                               tooltip="I2V / Fun-InP experts: start images, one per training sample, cycled "
                                       "(none: the reference's text-to-video conditioning)."),
                io.String.Input("start_images_folder", default="", optional=True,
                                tooltip="Instead: a folder of start images in ComfyUI's input folder."),
                int_input("inference_steps", "inference_steps", value=RECOMMENDED["inference_steps"], optional=True),
                float_input("guidance_scale", "guidance_scale", value=RECOMMENDED["guidance_scale"], step=0.1,
                            optional=True),
                float_input("shift", "shift", value=RECOMMENDED["shift"], step=0.1, optional=True),
                float_input("boundary", "boundary", value=RECOMMENDED["boundary"], step=0.005, optional=True),
                io.Int.Input("seed", default=RECOMMENDED["seed"], min=0, max=2 ** 31 - 1, optional=True,
                             control_after_generate=False, tooltip="Training seed (fixed: a resumed run keeps it)."),
                int_input("checkpoint_every", "checkpoint_every", value=RECOMMENDED["checkpoint_every"], optional=True),
            ],
            outputs=[
                LoraNameType.Output("lora_name", display_name="lora_name",
                                    tooltip="The trained LoRA's name in the loras folder (expert both: the high-noise "
                                            "one; the loader pairs the low-noise one); link it to a LoRA loader."),
                io.Image.Output("reward_curve", display_name="reward_curve"),
                io.String.Output("scores", display_name="scores"),
                LoraNameType.Output("best_lora_name", display_name="best_lora_name",
                                    tooltip="The best LoRA on the validation prompts (published beside the last); "
                                            "'None' when the base model scored best, the last LoRA without validation."),
                io.Int.Output("best_step", display_name="best_step",
                              tooltip="The step the best LoRA comes from (0: the base model)."),
            ],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, high_noise_model, low_noise_model, vae, reward_model, reward_weight, prompts, expert, rank,
                alpha, steps, learning_rate, width, height, frames, backprop_steps, gpus, deepspeed, output_name,
                resume, memory="auto", recipe="recommended", batch_size=1, gradient_accumulation=0, options=None, clip=None,
                prompt_embeddings="", prompts_file="", reward_variant=FROM_RECIPE, reward_preprocess=FROM_RECIPE,
                reward_model_2=NONE, reward_weight_2=1.0, reward_variant_2=FROM_RECIPE,
                reward_preprocess_2=FROM_RECIPE, init_lora=NONE, start_images=None, start_images_folder="",
                inference_steps=40, guidance_scale=6.0, shift=5.0, boundary=0.9, seed=42,
                checkpoint_every=100) -> io.NodeOutput:
        name = safe_output_name(output_name)
        try:
            devices = parse_devices(gpus, _visible_gpus())
        except LaunchError as exc:
            raise TrainInputError(str(exc)) from None
        options = options or {}
        rewards = [RewardChoice(model_file(REWARD_MODELS, reward_model, "reward_model"), float(reward_weight),
                                reward_variant, reward_preprocess, "reward_model")]
        if reward_model_2 and reward_model_2 != NONE:
            rewards.append(RewardChoice(model_file(REWARD_MODELS, reward_model_2, "reward_model_2"),
                                        float(reward_weight_2), reward_variant_2, reward_preprocess_2, "reward_model_2"))
        held_out = tuple(RewardChoice(model_file(REWARD_MODELS, file, slot), 1.0, options.get("held_out_variant",
                                                                                              FROM_RECIPE), FROM_RECIPE,
                                      f"options: {slot}") for file, slot in options.get("held_out", []))
        run_dir = Path(folder_paths.get_output_directory()) / RUNS_FOLDER / name
        owner = f"ComfyUI node {cls.hidden.unique_id}, output {name!r}"
        device_lock = DeviceLock(devices.lock_keys, owner=owner, names=devices.lock_names())
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
                _send({"event": "warning", "step": None, "message": notice}, cls.hidden.unique_id,
                      _current_prompt_id())
            run_dir.mkdir(parents=True, exist_ok=True)
            request = TrainRequest(
                recipe=recipe, expert=expert, output_dir=str(run_dir), output_name=name, memory=memory,
                processes=devices.num_processes, cpu=devices.cpu,
                high_noise_model=model_file("diffusion_models", high_noise_model, "high_noise_model"),
                low_noise_model=model_file("diffusion_models", low_noise_model, "low_noise_model"),
                vae=model_file("vae", vae, "vae"), rewards=tuple(rewards), held_out_rewards=held_out,
                base_model_name=f"{high_noise_model} + {low_noise_model}",
                lora_rank=int(rank), lora_alpha=float(alpha), max_steps=int(steps), learning_rate=float(learning_rate),
                batch_size=int(batch_size), gradient_accumulation_steps=int(gradient_accumulation), width=int(width),
                height=int(height), frames=int(frames), backprop_steps=int(backprop_steps),
                inference_steps=int(inference_steps), guidance_scale=float(guidance_scale), shift=float(shift),
                boundary=float(boundary), seed=int(seed), checkpoint_every=int(checkpoint_every), resume=bool(resume),
                init_lora=model_file("loras", init_lora, "init_lora") if init_lora and init_lora != NONE else None,
                validation_prompts=tuple(options.get("validation_prompts", ())),
                validation_every=int(options.get("validation_every", 0)) if options.get("validation_prompts") else 0,
                gaming_guard=options.get("gaming_guard", "warn"), gaming_patience=int(options.get("gaming_patience", 2)),
                sample_every=int(options.get("sample_every", 0)),
                average_last_checkpoints=int(options.get("average_last_checkpoints", 0)),
                motion_weight=float(options.get("motion_weight", 0.0)),
                **cls._prompt_inputs(prompts, prompts_file, prompt_embeddings, clip, float(guidance_scale) > 1,
                                     options.get("validation_prompts", ()), run_dir),
                **cls._image_inputs(start_images, start_images_folder, options, run_dir))
            try:  # every value and every file's contents, before anything is unloaded or launched
                plan = plan_run(request)
                memory_mode, deepspeed = choose_memory(plan, deepspeed, devices.cpu, *_memory_here(devices))
            except ConfigError as exc:
                raise input_error(exc) from None
            except PlacementError as exc:
                raise TrainInputError(f"input 'memory': {exc}") from None
            phases = phase_configs(plan.config)
            try:  # before hours of training: the targets must be absent or this run's own LoRAs
                for phase in phases:
                    for target in cls._targets(name, phase, plan.config):
                        check_publish_target(target, run_dir, phase.config_hash())
            except LaunchError as exc:
                raise TrainInputError(str(exc)) from None
            histories = cls._run(plan, phases, run_dir, devices, deepspeed)
        finally:
            folder_lock.release()
            device_lock.release()
        names = [cls._publish(run_dir, name, phase, plan.config, history) for phase, history in zip(phases, histories)]
        lora_name, best_name, best_step = names[0][0], names[-1][1], names[-1][2]
        if len(phases) == 2:
            best_name = names[0][1]
        history = concat_phases(histories, [p.max_steps for p in phases])
        curve = plot_training_curve(history)
        summaries = {p.expert: final_scores(h) for p, h in zip(phases, histories)}
        report = {"plan": plan.summary(), **(summaries[phases[0].expert] if len(phases) == 1 else summaries)}
        scores = json.dumps(report, indent=1, default=str)
        return io.NodeOutput(lora_name, curve, scores, best_name, best_step,
                             ui={"text": (scores,), **ui.PreviewImage(curve, cls=cls).as_dict()})

    # ---- inputs -----------------------------------------------------------------------------
    @staticmethod
    def _prompt_inputs(prompts: str, prompts_file: str, prompt_embeddings: str, clip, negative: bool,
                       validation_prompts, run_dir: Path) -> dict:
        """The training prompts and the embeddings file of every prompt the run uses (encoded here, once,
        with ComfyUI's loaded umT5 when ``clip`` is connected)."""
        lines = prompt_lines(prompts)
        prompts_file = (prompts_file or "").strip()
        if lines and prompts_file:
            raise TrainInputError("give the prompts either in 'prompts' or in 'prompts_file', not both")
        if prompts_file:
            from ..training.trainer.config import read_prompt_file

            try:
                lines = read_prompt_file(input_path(prompts_file, "prompts_file"), "prompts_file")
            except ConfigError as exc:
                raise input_error(exc) from None
        embeddings = (prompt_embeddings or "").strip()
        if clip is not None:
            if not lines:
                raise TrainInputError("input 'prompts' is empty: write the training prompts, one per line")
            from ..training.trainer.models import write_prompt_embeddings

            todo = list(dict.fromkeys(lines + list(validation_prompts) + ([""] if negative else [])))
            path = run_dir / "prompt_embeddings.safetensors"
            write_prompt_embeddings(path, encode_prompts(clip, todo))
            return {"prompts": tuple(lines), "prompt_embeddings": str(path)}
        if not embeddings:
            raise TrainInputError("connect the umt5 text encoder to 'clip' (CLIPLoader, type wan), or give "
                                  "'prompt_embeddings': a precomputed embeddings file in the input folder")
        return {"prompts": tuple(lines), "prompt_embeddings": input_path(embeddings, "prompt_embeddings")}

    @staticmethod
    def _image_inputs(start_images, start_images_folder: str, options: dict, run_dir: Path) -> dict:
        out = {}
        for field_name, images, folder, label in (
                ("start_images", start_images, start_images_folder, "start_images"),
                ("validation_start_images", options.get("validation_start_images"),
                 options.get("validation_start_images_folder", ""), "options: validation_start_images")):
            folder = (folder or "").strip()
            if images is not None and folder:
                raise TrainInputError(f"input '{label}': give the images or a folder, not both")
            if images is not None:
                out[field_name] = save_images(images, run_dir / f"{field_name}.safetensors", label)
            elif folder:
                out[field_name] = input_path(folder, f"{label}_folder", folder=True)
        return out

    @classmethod
    def _targets(cls, name: str, phase: TrainConfig, whole: TrainConfig) -> list[Path]:
        """Where a phase's LoRA and best LoRA go in the loras folder."""
        stem = phase.output_name
        best = f"{name}_best" if whole.expert != "both" else f"{name}_best_{phase.expert}_noise"
        return [cls._lora_target(stem), cls._lora_target(best)]

    # ---- the run ------------------------------------------------------------------------------
    @classmethod
    def _run(cls, plan: RunPlan, phases: list[TrainConfig], run_dir: Path, devices, preset: str) -> list[list[dict]]:
        import comfy.model_management as mm
        import comfy.utils

        node_id, prompt_id = cls.hidden.unique_id, _current_prompt_id()
        total = sum(p.max_steps for p in phases)
        bar = comfy.utils.ProgressBar(max(total, 1), node_id=node_id)
        histories = []
        unloaded = False
        for offset_index, phase in enumerate(phases):
            offset = sum(p.max_steps for p in phases[:offset_index])
            label = phase.expert if len(phases) > 1 else None
            _send({"event": "plan", "text": plan.summary() + (f"\nphase: {label}-noise LoRA" if label else "")},
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
            process = TrainerProcess(command, build_env(devices, threads=devices.cpu_threads()),
                                     phase.output_dir).start()

            def report(event: dict, offset=offset, label=label) -> None:
                _send(event, node_id, prompt_id, label)
                if event["event"] in ("started", "step") and event.get("max_steps"):
                    bar.update_absolute(offset + int(event.get("step", 0)), max(total, 1))

            try:
                result = follow(process, report, mm.processing_interrupted)
            except RunInterrupted as stopped:
                _send({"event": "cancelled", "message": f"{stopped}; queue again with resume on to continue from "
                       "the last checkpoint"}, node_id, prompt_id, label)
                raise mm.InterruptProcessingException() from None
            if result.returncode != 0 or result.finished is None:
                raise RuntimeError(failure_message(result, visible_gpus=_visible_gpus()))
            histories.append(run_events(phase.output_dir, result.events))
        return histories

    @classmethod
    def _publish(cls, run_dir: Path, name: str, phase: TrainConfig, whole: TrainConfig,
                 history: list[dict]) -> tuple[str, str, int]:
        """Copy a phase's LoRA (and its best LoRA) into the loras folder, atomically; returns their names
        in the list and the best step."""
        finished = next((e for e in reversed(history) if e.get("event") == "finished"), {})
        source = Path(finished.get("lora_path") or phase.lora_path)
        if not source.is_file():
            raise RuntimeError(f"the trainer finished but its LoRA {source} is missing; see "
                               f"{Path(phase.output_dir) / 'train.log'}")
        target, best_target = cls._targets(name, phase, whole)
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

    @staticmethod
    def _lora_target(stem: str) -> Path:
        return Path(folder_paths.get_folder_paths("loras")[0]) / f"{stem}.safetensors"


NODES = [WanRewardLoraTrain]
