"""Reward LoRA Train: runs the reward-backprop trainer as a subprocess and reports its progress.

The node declares its inputs; train_inputs.py resolves them to files (ComfyUI's folders, its
loaded text encoder, its images), ``training.trainer.run_request.plan_run`` builds and checks
the run and chooses its memory mode, and train_run.py launches each phase's trainer
(``accelerate launch ... training/train_reward_lora.py``), follows it and publishes its LoRAs.
ComfyUI is never relaunched per rank.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

import folder_paths
from comfy_api.latest import io, ui

from ..training.trainer.config import ConfigError, spec
from ..training.trainer.curves import concat_phases, final_scores, plot_training_curve
from ..training.trainer.devices import parse_devices
from ..training.trainer.failures import LaunchError
from ..training.trainer.launcher import PRESETS
from ..training.trainer.locks import FileLock, interrupted_run_notice, run_lock
from ..training.trainer.phases import phase_configs
from ..training.trainer.placement import REQUESTS, PlacementError
from ..training.trainer.publish import check_publish_target
from ..training.trainer.recipes import RECIPES
from ..training.trainer.run_request import FROM_RECIPE, RewardChoice, TrainRequest, choose_memory, plan_run
from .config_inputs import float_input, int_input
from .folders import REWARD_MODELS
from .train_inputs import TrainInputError, image_inputs, input_error, model_file, prompt_inputs, safe_output_name
from .train_options import PREPROCESS, VARIANTS, TrainOptionsType
from .train_run import (current_prompt_id, lora_targets, memory_here, publish_phase, run_phases, send,
                        visible_gpus)

CATEGORY = "Wan Reward LoRA/training"
RUNS_FOLDER = "wan_reward_lora"  # under ComfyUI's output folder: one run folder per output name
NONE = "none"
# The LoRA name outputs have the combo type, so they link into a loader's lora dropdown (V1 packs return
# the file list as the type for the same reason; V3 combo inputs check for "COMBO").
LoraNameType = io.Custom("COMBO")
RECOMMENDED = RECIPES["recommended"]


def _reward_inputs(suffix: str, optional: bool, rewards: list[str]) -> list:
    """The reward file and its weight (a second reward is optional)."""
    extra = dict(optional=True, default=NONE) if optional else {}
    return [
        io.Combo.Input("reward_model" + suffix, options=([NONE] if optional else []) + rewards,
                       tooltip="HPS v2.1, MPS, PickScore or aesthetic checkpoint (reward_models folder); the kind is "
                               "read from its keys",
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
            devices = parse_devices(gpus, visible_gpus())
        except LaunchError as exc:
            raise TrainInputError(str(exc)) from None
        options = options or {}
        rewards = (_reward_choice(reward_model, reward_weight, reward_variant, reward_preprocess, "reward_model"),)
        if reward_model_2 and reward_model_2 != NONE:
            rewards += (_reward_choice(reward_model_2, reward_weight_2, reward_variant_2, reward_preprocess_2,
                                       "reward_model_2"),)
        held_out = tuple(_reward_choice(file, 1.0, options.get("held_out_variant", FROM_RECIPE), FROM_RECIPE, slot,
                                        where=f"options: {slot}") for file, slot in options.get("held_out", []))
        run_dir = Path(folder_paths.get_output_directory()) / RUNS_FOLDER / name
        owner = f"ComfyUI node {cls.hidden.unique_id}, output {name!r}"
        with contextlib.ExitStack() as held:  # the run folder is written only while its locks are held
            try:  # one run per GPU and per run folder
                held.enter_context(FileLock(devices.lock_keys, owner=owner, names=devices.lock_names()))
                folder_lock = held.enter_context(run_lock(run_dir.parent, name, owner=owner))
                notice = interrupted_run_notice(run_dir, folder_lock.previous.get(name), bool(resume))
            except LaunchError as exc:  # busy, or a trainer a dead ComfyUI left running: never trained over
                raise RuntimeError(str(exc)) from None
            if notice:
                logging.warning("Reward LoRA Train: %s", notice)
                send({"event": "warning", "step": None, "message": notice}, cls.hidden.unique_id, current_prompt_id())
            run_dir.mkdir(parents=True, exist_ok=True)
            request = TrainRequest(
                recipe=recipe, expert=expert, output_dir=str(run_dir), output_name=name, memory=memory,
                processes=devices.num_processes, cpu=devices.cpu,
                high_noise_model=model_file("diffusion_models", high_noise_model, "high_noise_model"),
                low_noise_model=model_file("diffusion_models", low_noise_model, "low_noise_model"),
                vae=model_file("vae", vae, "vae"), rewards=rewards, held_out_rewards=held_out,
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
                **prompt_inputs(prompts, prompts_file, prompt_embeddings, clip, float(guidance_scale) > 1,
                                options.get("validation_prompts", ()), run_dir),
                **image_inputs(start_images, start_images_folder, options, run_dir))
            plan, phases, deepspeed = _checked_plan(request, deepspeed, devices, name, run_dir)
            histories = run_phases(plan, phases, devices, deepspeed, cls.hidden.unique_id)
        return _outputs(cls, plan, phases, histories, run_dir, name)


def _reward_choice(file: str, weight: float, variant: str, preprocess: str, slot: str,
                   where: str | None = None) -> RewardChoice:
    """One reward input (or held-out reward of the options node) resolved to its file."""
    return RewardChoice(model_file(REWARD_MODELS, file, slot), float(weight), variant, preprocess, where or slot)


def _checked_plan(request: TrainRequest, deepspeed: str, devices, name: str, run_dir: Path):
    """The checked run plan, its phases and DeepSpeed preset; every fault is an error naming its input,
    raised before anything is unloaded or launched."""
    try:  # every value and every file's contents
        plan = plan_run(request)
        _, deepspeed = choose_memory(plan, deepspeed, devices.cpu, *memory_here(devices))
    except ConfigError as exc:
        raise input_error(exc) from None
    except PlacementError as exc:
        raise TrainInputError(f"input 'memory': {exc}") from None
    phases = phase_configs(plan.config)
    try:  # before hours of training: the targets must be absent or this run's own LoRAs
        for phase in phases:
            for target in lora_targets(name, phase, plan.config):
                check_publish_target(target, run_dir, phase.config_hash())
    except LaunchError as exc:
        raise TrainInputError(str(exc)) from None
    return plan, phases, deepspeed


def _outputs(cls, plan, phases, histories, run_dir: Path, name: str) -> io.NodeOutput:
    """Publish each phase's LoRAs. The LoRA and best-LoRA outputs are the first phase's (with ``expert:
    both`` the high-noise one, which the Dual LoRA Loader pairs with its low-noise partner); the curve
    and the scores cover every phase."""
    names = [publish_phase(run_dir, name, phase, plan.config, history) for phase, history in zip(phases, histories)]
    lora_name, best_name, best_step = names[0]
    curve = plot_training_curve(concat_phases(histories, [p.max_steps for p in phases]))
    summaries = {p.expert: final_scores(h) for p, h in zip(phases, histories)}
    report = {"plan": plan.summary(), **(summaries[phases[0].expert] if len(phases) == 1 else summaries)}
    scores = json.dumps(report, indent=1, default=str)
    return io.NodeOutput(lora_name, curve, scores, best_name, best_step,
                         ui={"text": (scores,), **ui.PreviewImage(curve, cls=cls).as_dict()})


NODES = [WanRewardLoraTrain]
