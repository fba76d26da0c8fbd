"""The relations between a run config's fields (each field alone is checked in config.py), ending
with the contents of every model file (input_files.py). Each check raises ``ConfigError`` naming
the first wrong field and what to do."""

from __future__ import annotations

import os

from .config_fields import FIELDS, ConfigError, TrainConfig, spec

def _need_file(name: str, path: str | None, what: str) -> None:
    if not path:
        raise ConfigError(name, f"is required: the {what}")
    if not os.path.isfile(path):
        raise ConfigError(name, f"file not found: {path} (the {what})")


def resolve_accumulation(cfg: TrainConfig, processes: int) -> int:
    """Micro-steps per optimizer step for ``processes`` processes: the configured value, or with
    ``gradient_accumulation_steps: 0`` the one that makes ``effective_batch``."""
    if cfg.gradient_accumulation_steps:
        return cfg.gradient_accumulation_steps
    per_step = cfg.batch_size * processes
    target = cfg.effective_batch or per_step
    if target % per_step:
        raise ConfigError("gradient_accumulation_steps", f"0 (automatic) cannot form the batch of {target} "
                          f"(effective_batch) from batch_size {cfg.batch_size} x {processes} process(es): use a "
                          f"process count and batch_size whose product divides {target}, or set "
                          "gradient_accumulation_steps (the effective batch then differs from the recipe's)")
    return target // per_step


def validate(cfg: TrainConfig, check_files: bool = True) -> None:
    """Raise ConfigError naming the first wrong field (relations between fields; files)."""
    _check_models_and_outputs(cfg, check_files)
    _check_prompts(cfg)
    _check_rewards(cfg, check_files)
    _check_sampling(cfg)
    _check_guards(cfg)
    if check_files:  # last: the values are sound, now the files' contents
        from .input_files import check_input_files

        check_input_files(cfg)


def _check_models_and_outputs(cfg: TrainConfig, check_files: bool) -> None:
    for name, what in (("high_noise_model", "high-noise expert (ComfyUI diffusion_models file)"),
                       ("low_noise_model", "low-noise expert (ComfyUI diffusion_models file)"),
                       ("vae", "Wan2.1 VAE file")):
        if check_files:
            _need_file(name, getattr(cfg, name), what)
        elif not getattr(cfg, name):
            raise ConfigError(name, f"is required: the {what}")
    if not cfg.output_dir:
        raise ConfigError("output_dir", "is required: the folder the LoRA and checkpoints are written to")
    if not cfg.output_name or any(c in cfg.output_name for c in "/\\") or cfg.output_name.startswith("."):
        raise ConfigError("output_name", f"must be a plain file stem without folders, got {cfg.output_name!r}")
    if cfg.prompt_embeddings and cfg.text_encoder:
        raise ConfigError("text_encoder", "give either prompt_embeddings or text_encoder, not both")
    if not cfg.prompt_embeddings and not cfg.text_encoder:
        raise ConfigError("prompt_embeddings", "is required unless text_encoder (umt5-xxl) is given")
    if check_files:
        for name in [n for n in FIELDS if spec(n).kind == "path?"]:
            value = getattr(cfg, name)
            if not value:
                continue
            if spec(name).folder or name.endswith("start_images"):
                if not os.path.exists(value):
                    raise ConfigError(name, f"not found: {value}")
            elif not os.path.isfile(value):
                raise ConfigError(name, f"file not found: {value}")


def _check_prompts(cfg: TrainConfig) -> None:
    if cfg.prompts is not None and cfg.prompts_file:
        raise ConfigError("prompts_file", "give either prompts or prompts_file, not both")
    if cfg.prompts is not None and not [p for p in cfg.prompts if p.strip()]:
        raise ConfigError("prompts", "is empty: give at least one training prompt")
    if cfg.prompts is None and not cfg.prompts_file and not cfg.prompt_embeddings:
        raise ConfigError("prompts", "is required: a list of prompts or prompts_file")


def _check_rewards(cfg: TrainConfig, check_files: bool) -> None:
    if not cfg.rewards:
        raise ConfigError("rewards", "is required: at least one reward, e.g. [{model: hps, path: HPS_v2.1_compressed.pt}]")
    if sum(r.weight for r in cfg.rewards) <= 0:
        raise ConfigError("rewards", "the weights sum to 0: give at least one reward a positive weight")
    for group in ("rewards", "held_out_rewards"):
        for i, reward in enumerate(getattr(cfg, group)):
            if check_files and not os.path.isfile(reward.path):
                raise ConfigError(f"{group}[{i}].path", f"file not found: {reward.path}")
    if cfg.lora_targets != "all_linear" and not cfg.lora_targets:
        raise ConfigError("lora_targets", "is empty: use 'all_linear' or a list like ['self_attn.q', 'cross_attn.k']")
    if cfg.effective_batch is not None and cfg.gradient_accumulation_steps == 0:
        resolve_accumulation(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    elif cfg.gradient_accumulation_steps == 0:
        raise ConfigError("gradient_accumulation_steps", "0 (automatic) needs effective_batch (the batch to form)")


def _check_sampling(cfg: TrainConfig) -> None:
    for name in ("height", "width"):
        if getattr(cfg, name) % 16:
            raise ConfigError(name, f"must be a positive multiple of 16, got {getattr(cfg, name)}")
    if (cfg.frames - 1) % 4:
        raise ConfigError("frames", f"must be 4k+1 (1, 5, ..., 81), got {cfg.frames}")
    _check_window(cfg)
    if cfg.decoded_latents > cfg.latent_frames:
        raise ConfigError("decoded_latents", f"is {cfg.decoded_latents} but {cfg.frames} frames give only "
                          f"{cfg.latent_frames} latent frames")
    if cfg.reward_frames is not None:
        decoded = 1 + 4 * (cfg.decoded_latents - 1)
        if cfg.reward_frames > decoded:
            raise ConfigError("reward_frames", f"must be in 1..{decoded} (frames decoded from "
                              f"{cfg.decoded_latents} latents) or null, got {cfg.reward_frames}")
    if cfg.motion_weight > 0 and cfg.motion_latents > cfg.latent_frames:
        raise ConfigError("motion_latents", f"is {cfg.motion_latents} but {cfg.frames} frames give only "
                          f"{cfg.latent_frames} latent frames; the motion term needs at least 2 (frames >= 5)")


def _check_guards(cfg: TrainConfig) -> None:
    """Checkpoints, validation and the guards."""
    if cfg.average_last_checkpoints > cfg.checkpoints_keep:
        raise ConfigError("average_last_checkpoints", f"is {cfg.average_last_checkpoints} but only checkpoints_keep="
                          f"{cfg.checkpoints_keep} checkpoints are kept: raise checkpoints_keep")
    if cfg.validation_every and not (cfg.validation_prompts or cfg.validation_prompts_file):
        raise ConfigError("validation_prompts", "is empty but validation_every > 0: give held-out prompts")
    if cfg.held_out_rewards and not (cfg.validation_prompts or cfg.validation_prompts_file):
        raise ConfigError("validation_prompts", "is empty but held_out_rewards are set: held-out rewards are scored "
                          "on the validation prompts only; give validation prompts, or drop held_out_rewards")
    if cfg.expert == "both" and (cfg.frozen_expert_lora or cfg.init_lora):
        raise ConfigError("expert", "both trains the two LoRAs itself: drop frozen_expert_lora / init_lora, or train "
                          "one expert")


def _check_window(cfg: TrainConfig) -> None:
    """The backprop window fits the trained expert's share of the schedule."""
    from .sampler import expert_step_range  # light: no model code

    for expert in (("high", "low") if cfg.expert == "both" else (cfg.expert,)):
        first, last = expert_step_range(cfg.inference_steps, cfg.shift, cfg.boundary, expert)
        n_range = last - first
        if n_range <= 0:
            raise ConfigError("boundary", f"with inference_steps={cfg.inference_steps}, shift={cfg.shift} and "
                              f"boundary={cfg.boundary} the {expert}-noise expert gets no step")
        if cfg.backprop_steps > n_range:
            raise ConfigError("backprop_steps", f"is {cfg.backprop_steps} but the {expert}-noise expert has only "
                              f"{n_range} steps (indices {first}..{last - 1})")
        if cfg.backprop_strategy == "random" and cfg.backprop_random_last > n_range:
            raise ConfigError("backprop_random_last", f"must be in 1..{n_range} (the {expert}-noise expert's "
                              f"steps), got {cfg.backprop_random_last}")
