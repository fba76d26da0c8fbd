"""The parts a run is set up from: prompts and their embeddings, the LoRA on the trained expert,
the reward models. Each refusal is a ConfigError naming the config field."""

from __future__ import annotations

import contextlib

import torch

from ..safe_io import UserFileError
from .config import ConfigError, TrainConfig, read_prompt_file
from .lora import add_lora, set_lora_weights, target_modules

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": torch.float32}


def resolve_prompts(cfg: TrainConfig) -> tuple[list[str], list[str]]:
    from .models import prompts_in_embeddings

    if cfg.prompts is not None:
        train = [p.strip() for p in cfg.prompts if p.strip()]
    elif cfg.prompts_file:
        train = read_prompt_file(cfg.prompts_file, "prompts_file")
    else:
        train = [p for p in prompts_in_embeddings(cfg.prompt_embeddings) if p != cfg.negative_prompt]
        if not train:
            raise ConfigError("prompt_embeddings", f"{cfg.prompt_embeddings} holds no training prompt")
    val = list(cfg.validation_prompts)
    if cfg.validation_prompts_file:
        val += read_prompt_file(cfg.validation_prompts_file, "validation_prompts_file")
    if cfg.prompt_embeddings:
        have = set(prompts_in_embeddings(cfg.prompt_embeddings))
        for field_name, prompts in (("prompts", train), ("validation_prompts", val),
                                    ("negative_prompt", [cfg.negative_prompt] if cfg.guidance_scale > 1 else [])):
            absent = [p for p in prompts if p not in have]
            if absent:
                raise ConfigError(field_name, f"{len(absent)} prompt(s) have no embedding in {cfg.prompt_embeddings}, "
                                  f"e.g. {absent[0]!r}; recompute the embeddings file or use text_encoder")
    return train, val


@contextlib.contextmanager
def file_field(field_name: str):
    """A user file that cannot be used becomes a config error naming its field (and the file)."""
    try:
        yield
    except UserFileError as exc:
        raise ConfigError(field_name, str(exc)) from exc


def load_embeddings(cfg: TrainConfig, prompts: list[str], device) -> dict[str, torch.Tensor]:
    from .models import encode_prompts_umt5, read_prompt_embeddings

    if cfg.prompt_embeddings:
        with file_field("prompt_embeddings"):
            return read_prompt_embeddings(cfg.prompt_embeddings)
    with file_field("text_encoder"):
        return encode_prompts_umt5(prompts, cfg.text_encoder, cfg.tokenizer, device, DTYPES[cfg.mixed_precision])


def adapt(cfg: TrainConfig, model) -> tuple[list[str], float]:
    """Inject the LoRA (from ``init_lora`` when set: its rank, alpha and weights); returns the
    adapted paths and the LoRA's alpha. A target list that selects nothing (or an entry that
    matches no module) is a config error naming lora_targets."""
    from ..wan_names import diffusers_to_native

    names = target_modules(model, cfg.lora_targets, cfg.lora_exclude)
    if not names:
        raise ConfigError("lora_targets", f"{cfg.lora_targets!r} with lora_exclude={cfg.lora_exclude!r} selects no "
                          "Linear layer; use 'all_linear' or native suffixes like self_attn.q, cross_attn.o")
    if cfg.lora_targets != "all_linear":
        natives = [diffusers_to_native(n) for n in names]
        unused = [t for t in cfg.lora_targets if not any(n == t or n.endswith("." + t) for n in natives)]
        if unused:
            raise ConfigError("lora_targets", f"{unused[0]!r} matches no adapted Linear layer (after "
                              f"lora_exclude={cfg.lora_exclude!r}); valid suffixes look like self_attn.q, "
                              "cross_attn.k, ffn.0, text_embedding.0")
    if not cfg.init_lora:
        return add_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, cfg.lora_exclude), cfg.lora_alpha
    from ..lora_format import read_lora

    with file_field("init_lora"):
        modules = read_lora(cfg.init_lora).as_modules()
    _, down, alpha = next(iter(modules.values()))
    alpha = float(down.shape[0]) if alpha is None else alpha  # no alpha: scale 1, as the loader reads it
    adapted = add_lora(model, down.shape[0], alpha, cfg.lora_targets, cfg.lora_exclude)
    set_lora_weights(model, modules)
    return adapted, alpha


def load_rewards(specs, device, dtype, field_name: str):
    from ..rewards import load_reward_model

    models = []
    for i, spec in enumerate(specs):
        try:
            model = load_reward_model(spec.path, device=device, dtype=dtype, variant=spec.variant,
                                      preprocess=spec.preprocess or "reference")
        except UserFileError as exc:
            raise ConfigError(f"{field_name}[{i}].path", str(exc)) from exc
        if not model.name.startswith(spec.model):
            raise ConfigError(f"{field_name}[{i}].model", f"is {spec.model!r} but {spec.path} is a {model.name} "
                              "checkpoint; fix model or path")
        model.requires_grad_(False)
        models.append((spec, model))
    return models
