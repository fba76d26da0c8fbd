"""The trainer's run configuration: schema, YAML loading and validation.

One flat YAML mapping (``yaml.safe_load``), written by hand or by the ComfyUI
"Reward LoRA Train" node, validated completely before any model is loaded. Every
error is a ``ConfigError`` that names the field, the value and what to do.

Schema (field: type, default; ``!`` = required). Paths may be relative to the
YAML file's folder.

Models
  expert: "high" | "low", "low"          which expert the LoRA trains
  high_noise_model: path !               ComfyUI diffusion_models file of the high-noise expert
  low_noise_model: path !                the same for the low-noise expert (both are needed:
                                         every trajectory crosses the boundary)
  vae: path !                            Wan2.1 VAE, ComfyUI vae-folder format
  prompt_embeddings: path | null         precomputed umT5 embeddings (safetensors, see
                                         training/trainer/models.py: write_prompt_embeddings)
  text_encoder: path | null              umt5-xxl encoder (ComfyUI text_encoders format)
  tokenizer: path | null                 folder with the umt5 tokenizer; not needed for ComfyUI's
                                         umt5 files, which embed theirs (spiece_model)
  base_model_name: str, ""               recorded in the LoRA metadata
Prompts
  prompts: list[str] | null              training prompts, or
  prompts_file: path | null              a text file, one prompt per line (blank lines skipped);
                                         with neither, all prompts of prompt_embeddings are used
  negative_prompt: str, ""               the seed trains with an empty negative prompt
  validation_prompts: list[str], []      held-out prompts (never trained on)
  validation_prompts_file: path | null
Rewards
  rewards: list !                        [{model: hps|mps|pickscore|aesthetic, path: file, weight: 1.0, variant: str|null,
                                           preprocess: reference|squash|null}]
                                         variant: MPS "official" (default) or "seed"; preprocess: the
                                         reward model's own ("reference", default) or the seed's
                                         224x224 stretch ("squash")
                                         loss = sum_i weight_i * (1 - reward_i) / sum_i weight_i
  held_out_rewards: list, []             same form, scored on validation only, never optimised
LoRA
  lora_rank: int, 128
  lora_alpha: float, 64
  lora_targets: "all_linear" | list[str], "all_linear"   native name suffixes, e.g. "self_attn.q"
  lora_exclude: list[str], ["ffn"]       substrings of native module paths to skip (seed: ffn)
Optimisation
  learning_rate: float, 1e-5
  optimizer: "adamw", "adamw"
  adam_beta1: 0.9, adam_beta2: 0.999, adam_epsilon: 1e-10, weight_decay: 3e-2
  lr_scheduler: constant | constant_with_warmup | linear | cosine, "constant"
  lr_warmup_steps: int, 0
  max_grad_norm: float, 0.3              applied (DeepSpeed gradient_clipping or torch clipping); 0 = off
  max_steps: int, 10000                  optimizer steps
  batch_size: int, 1                     prompts per process per micro-step
  gradient_accumulation_steps: int, 1
  seed: int, 42
  gradient_checkpointing: bool, true
  mixed_precision: "bf16" | "fp16" | "no", "bf16"   ("no" = float32; CPU runs should use "no";
                                         fp16 only under DeepSpeed, which scales the loss)
Sampling (training trajectories)
  height: int, 256; width: int, 256      multiples of 16
  frames: int, 81                        4k+1
  inference_steps: int, 40
  guidance_scale: float, 6.0             CFG on when > 1
  shift: float, 5.0
  boundary: float, 0.9                   expert switch at t = boundary*1000 (0.875 T2V, 0.9 I2V/InP)
Backpropagation
  backprop_strategy: "tail" | "random", "tail"
      tail: the last backprop_steps steps of the trained expert's range (DRaFT-K)
      random: one step drawn among the last backprop_random_last steps of that range (AlignProp)
  backprop_steps: int, 1
  backprop_random_last: int, 5
  decoded_latents: int, 1                latent frames decoded for the reward (1 = first frame only)
  reward_frames: int | null, null        frames sampled evenly from the decoded ones (null = all)
Checkpoints, validation, guards
  output_dir: path !                     everything is written here
  output_name: str, "reward_lora"        LoRA file stem: <output_dir>/<output_name>.safetensors
  checkpoint_every: int, 100             steps; 0 = only at the end / on request
  checkpoints_keep: int, 2               older checkpoints are deleted
  resume: bool, true                     continue from <output_dir>/checkpoints/latest.json if present
                                         (refused if the config changed outside
                                         checkpoint.RESUME_HARMLESS); false: start over, an
                                         earlier checkpoints/ folder is renamed aside
  validation_every: int, 0               steps; 0 = off (needs validation_prompts)
  validation_seed: int, 1234
  gaming_guard: "warn" | "stop" | "off", "warn"
  gaming_patience: int, 2                consecutive validations with the training reward up and
                                         a held-out reward or motion down before warn/stop
  ema_last_checkpoints: int, 0           >1: also export the exact average of the last N checkpoint
                                         LoRAs (not an EMA: one LoRA of rank N x lora_rank)
  sample_every: int, 0                   steps; save the decoded training frames as PNG (0 = off)
  preflight: bool, true                  check GPUs and memory before loading models
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REWARD_MODELS = ("hps", "mps", "pickscore", "aesthetic")
EXPERTS = ("high", "low")
SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")
PRECISIONS = ("bf16", "fp16", "no")
STRATEGIES = ("tail", "random")
GAMING_GUARDS = ("warn", "stop", "off")


class ConfigError(ValueError):
    """A run configuration value is missing or wrong; ``field`` names it."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"config field '{field_name}': {message}")
        self.field = field_name


@dataclass
class RewardSpec:
    model: str
    path: str
    weight: float = 1.0
    variant: str | None = None
    preprocess: str | None = None

    @property
    def name(self) -> str:
        return self.model if not self.variant else f"{self.model}-{self.variant}"


@dataclass
class TrainConfig:
    # models
    high_noise_model: str = ""
    low_noise_model: str = ""
    vae: str = ""
    expert: str = "low"
    prompt_embeddings: str | None = None
    text_encoder: str | None = None
    tokenizer: str | None = None
    base_model_name: str = ""
    # prompts
    prompts: list[str] | None = None
    prompts_file: str | None = None
    negative_prompt: str = ""
    validation_prompts: list[str] = field(default_factory=list)
    validation_prompts_file: str | None = None
    # rewards
    rewards: list[RewardSpec] = field(default_factory=list)
    held_out_rewards: list[RewardSpec] = field(default_factory=list)
    # LoRA
    lora_rank: int = 128
    lora_alpha: float = 64.0
    lora_targets: Any = "all_linear"
    lora_exclude: list[str] = field(default_factory=lambda: ["ffn"])
    # optimisation
    learning_rate: float = 1e-5
    optimizer: str = "adamw"
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-10
    weight_decay: float = 3e-2
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    max_grad_norm: float = 0.3
    max_steps: int = 10000
    batch_size: int = 1
    gradient_accumulation_steps: int = 1
    seed: int = 42
    gradient_checkpointing: bool = True
    mixed_precision: str = "bf16"
    # sampling
    height: int = 256
    width: int = 256
    frames: int = 81
    inference_steps: int = 40
    guidance_scale: float = 6.0
    shift: float = 5.0
    boundary: float = 0.9
    # backprop
    backprop_strategy: str = "tail"
    backprop_steps: int = 1
    backprop_random_last: int = 5
    decoded_latents: int = 1
    reward_frames: int | None = None
    # outputs, validation, guards
    output_dir: str = ""
    output_name: str = "reward_lora"
    checkpoint_every: int = 100
    checkpoints_keep: int = 2
    resume: bool = True
    validation_every: int = 0
    validation_seed: int = 1234
    gaming_guard: str = "warn"
    gaming_patience: int = 2
    ema_last_checkpoints: int = 0
    sample_every: int = 0
    preflight: bool = True

    # ---- derived helpers -------------------------------------------------
    @property
    def lora_path(self) -> Path:
        return Path(self.output_dir) / f"{self.output_name}.safetensors"

    @property
    def best_lora_path(self) -> Path:
        return Path(self.output_dir) / f"{self.output_name}_best.safetensors"

    @property
    def ema_lora_path(self) -> Path:
        return Path(self.output_dir) / f"{self.output_name}_ema.safetensors"

    @property
    def latent_frames(self) -> int:
        return (self.frames - 1) // 4 + 1

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def config_hash(self) -> str:
        """sha256 (16 hex) of the settings that shape the LoRA (not paths of outputs)."""
        data = self.to_dict()
        for key in ("output_dir", "resume", "preflight", "checkpoint_every", "checkpoints_keep"):
            data.pop(key, None)
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_INT_FIELDS = {"lora_rank", "lr_warmup_steps", "max_steps", "batch_size",
               "gradient_accumulation_steps", "seed", "height", "width", "frames",
               "inference_steps", "backprop_steps", "backprop_random_last", "decoded_latents",
               "checkpoint_every", "checkpoints_keep", "validation_every", "validation_seed",
               "gaming_patience", "ema_last_checkpoints", "sample_every"}
_FLOAT_FIELDS = {"lora_alpha", "learning_rate", "adam_beta1", "adam_beta2", "adam_epsilon",
                 "weight_decay", "max_grad_norm", "guidance_scale", "shift", "boundary"}
_BOOL_FIELDS = {"gradient_checkpointing", "resume", "preflight"}
_STR_FIELDS = {"high_noise_model", "low_noise_model", "vae", "expert", "base_model_name",
               "negative_prompt", "optimizer", "lr_scheduler", "mixed_precision",
               "backprop_strategy", "output_dir", "output_name", "gaming_guard"}
_OPT_PATH_FIELDS = {"prompt_embeddings", "text_encoder", "tokenizer", "prompts_file",
                    "validation_prompts_file"}


def _want_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(name, f"must be an integer, got {value!r}")
    return value


def _want_float(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(name, f"must be a number, got {value!r}")
    return float(value)


def _reward_list(name: str, value) -> list[RewardSpec]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ConfigError(name, f"must be a list of {{model, path, weight}} mappings, got {value!r}")
    specs = []
    for i, item in enumerate(value):
        where = f"{name}[{i}]"
        if isinstance(item, RewardSpec):
            item = dataclasses.asdict(item)
        if not isinstance(item, dict):
            raise ConfigError(where, f"must be a mapping like {{model: hps, path: HPS_v2.1.pt}}, got {item!r}")
        unknown = set(item) - {"model", "path", "weight", "variant", "preprocess"}
        if unknown:
            raise ConfigError(f"{where}.{sorted(unknown)[0]}",
                              "unknown key (allowed: model, path, weight, variant, preprocess)")
        model = item.get("model")
        if model not in REWARD_MODELS:
            raise ConfigError(f"{where}.model", f"must be one of {', '.join(REWARD_MODELS)}, got {model!r}")
        path = item.get("path")
        if not isinstance(path, str) or not path:
            raise ConfigError(f"{where}.path", f"must be the reward model's checkpoint file, got {path!r}")
        weight = _want_float(f"{where}.weight", item.get("weight", 1.0))
        if weight < 0:
            raise ConfigError(f"{where}.weight", f"must be >= 0, got {weight}")
        variant = item.get("variant")
        if variant is not None and not isinstance(variant, str):
            raise ConfigError(f"{where}.variant", f"must be a string or null, got {variant!r}")
        preprocess = item.get("preprocess")
        if preprocess not in (None, "reference", "squash"):
            raise ConfigError(f"{where}.preprocess", f"must be 'reference' (the reward model's own resize and "
                              f"pad), 'squash' (the seed's 224x224 stretch) or null, got {preprocess!r}")
        specs.append(RewardSpec(model=model, path=path, weight=weight, variant=variant, preprocess=preprocess))
    return specs


def _string_list(name: str, value) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(name, f"must be a list of strings, got {value!r}")
    return list(value)


def config_from_dict(data: dict, base_dir: str | os.PathLike | None = None,
                     check_files: bool = True) -> TrainConfig:
    """Build and validate a TrainConfig; relative paths resolve against ``base_dir``."""
    if not isinstance(data, dict):
        raise ConfigError("<root>", f"the config must be a mapping of field: value, got {type(data).__name__}")
    for key in data:
        if key not in _FIELDS:
            close = [f for f in _FIELDS if f.split("_")[0] == str(key).split("_")[0]]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(str(key), f"unknown field{hint}; see training/trainer/config.py for the schema")
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key in _INT_FIELDS:
            value = _want_int(key, value)
        elif key in _FLOAT_FIELDS:
            value = _want_float(key, value)
        elif key in _BOOL_FIELDS:
            if not isinstance(value, bool):
                raise ConfigError(key, f"must be true or false, got {value!r}")
        elif key in _STR_FIELDS:
            if not isinstance(value, str):
                raise ConfigError(key, f"must be a string, got {value!r}")
        elif key in _OPT_PATH_FIELDS:
            if value is not None and (not isinstance(value, str) or not value):
                raise ConfigError(key, f"must be a file path or null, got {value!r}")
        elif key in ("rewards", "held_out_rewards"):
            value = _reward_list(key, value)
        elif key in ("prompts",):
            value = None if value is None else _string_list(key, value)
        elif key in ("validation_prompts", "lora_exclude"):
            value = _string_list(key, value if value is not None else [])
        elif key == "reward_frames":
            value = None if value is None else _want_int(key, value)
        elif key == "lora_targets":
            if value != "all_linear":
                value = _string_list(key, value)
        values[key] = value
    cfg = TrainConfig(**values)
    if base_dir is not None:
        _resolve_paths(cfg, Path(base_dir))
    validate(cfg, check_files=check_files)
    return cfg


def _resolve_paths(cfg: TrainConfig, base: Path) -> None:
    for name in ("high_noise_model", "low_noise_model", "vae", "output_dir") + tuple(sorted(_OPT_PATH_FIELDS)):
        value = getattr(cfg, name)
        if value and not os.path.isabs(os.path.expanduser(value)):
            setattr(cfg, name, str(base / value))
        elif value:
            setattr(cfg, name, os.path.expanduser(value))
    for spec in cfg.rewards + cfg.held_out_rewards:
        if not os.path.isabs(os.path.expanduser(spec.path)):
            spec.path = str(base / spec.path)


def _need_file(name: str, path: str | None, what: str) -> None:
    if not path:
        raise ConfigError(name, f"is required: the {what}")
    if not os.path.isfile(path):
        raise ConfigError(name, f"file not found: {path} (the {what})")


def validate(cfg: TrainConfig, check_files: bool = True) -> None:
    """Raise ConfigError naming the first wrong field."""
    if cfg.expert not in EXPERTS:
        raise ConfigError("expert", f"must be 'high' or 'low', got {cfg.expert!r}")
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
    # text conditioning
    if cfg.prompt_embeddings and cfg.text_encoder:
        raise ConfigError("text_encoder", "give either prompt_embeddings or text_encoder, not both")
    if not cfg.prompt_embeddings and not cfg.text_encoder:
        raise ConfigError("prompt_embeddings", "is required unless text_encoder (umt5-xxl) is given")
    if check_files:
        for name in ("prompt_embeddings", "text_encoder", "prompts_file", "validation_prompts_file"):
            value = getattr(cfg, name)
            if value and not os.path.isfile(value):
                raise ConfigError(name, f"file not found: {value}")
        if cfg.tokenizer and not os.path.isdir(cfg.tokenizer):
            raise ConfigError("tokenizer", f"folder not found: {cfg.tokenizer}")
        if cfg.text_encoder and not cfg.tokenizer:
            from .models import encoder_has_tokenizer

            if not encoder_has_tokenizer(cfg.text_encoder):
                raise ConfigError("tokenizer", f"{cfg.text_encoder} has no embedded tokenizer (ComfyUI's umt5 files "
                                  "do): give the folder of the google/umt5-xxl tokenizer")
    if cfg.prompts is not None and cfg.prompts_file:
        raise ConfigError("prompts_file", "give either prompts or prompts_file, not both")
    if cfg.prompts is not None and not [p for p in cfg.prompts if p.strip()]:
        raise ConfigError("prompts", "is empty: give at least one training prompt")
    if cfg.prompts is None and not cfg.prompts_file and not cfg.prompt_embeddings:
        raise ConfigError("prompts", "is required: a list of prompts or prompts_file")
    # rewards
    if not cfg.rewards:
        raise ConfigError("rewards", "is required: at least one reward, e.g. [{model: hps, path: HPS_v2.1_compressed.pt}]")
    if sum(r.weight for r in cfg.rewards) <= 0:
        raise ConfigError("rewards", "the weights sum to 0: give at least one reward a positive weight")
    for group in ("rewards", "held_out_rewards"):
        for i, spec in enumerate(getattr(cfg, group)):
            if check_files and not os.path.isfile(spec.path):
                raise ConfigError(f"{group}[{i}].path", f"file not found: {spec.path}")
    # LoRA
    if cfg.lora_rank < 1:
        raise ConfigError("lora_rank", f"must be >= 1, got {cfg.lora_rank}")
    if cfg.lora_alpha <= 0:
        raise ConfigError("lora_alpha", f"must be > 0, got {cfg.lora_alpha}")
    if cfg.lora_targets != "all_linear" and not cfg.lora_targets:
        raise ConfigError("lora_targets", "is empty: use 'all_linear' or a list like ['self_attn.q', 'cross_attn.k']")
    # optimisation
    if not (0 < cfg.learning_rate < 1):
        raise ConfigError("learning_rate", f"must be in (0, 1), got {cfg.learning_rate}")
    if cfg.optimizer != "adamw":
        raise ConfigError("optimizer", f"only 'adamw' is supported, got {cfg.optimizer!r}")
    for name in ("adam_beta1", "adam_beta2"):
        if not (0 <= getattr(cfg, name) < 1):
            raise ConfigError(name, f"must be in [0, 1), got {getattr(cfg, name)}")
    if cfg.adam_epsilon <= 0:
        raise ConfigError("adam_epsilon", f"must be > 0, got {cfg.adam_epsilon}")
    if cfg.weight_decay < 0:
        raise ConfigError("weight_decay", f"must be >= 0, got {cfg.weight_decay}")
    if cfg.lr_scheduler not in SCHEDULERS:
        raise ConfigError("lr_scheduler", f"must be one of {', '.join(SCHEDULERS)}, got {cfg.lr_scheduler!r}")
    if cfg.lr_warmup_steps < 0:
        raise ConfigError("lr_warmup_steps", f"must be >= 0, got {cfg.lr_warmup_steps}")
    if cfg.max_grad_norm < 0:
        raise ConfigError("max_grad_norm", f"must be >= 0 (0 turns clipping off), got {cfg.max_grad_norm}")
    for name in ("max_steps", "batch_size", "gradient_accumulation_steps", "inference_steps",
                 "backprop_steps", "decoded_latents"):
        if getattr(cfg, name) < 1:
            raise ConfigError(name, f"must be >= 1, got {getattr(cfg, name)}")
    if cfg.mixed_precision not in PRECISIONS:
        raise ConfigError("mixed_precision", f"must be one of {', '.join(PRECISIONS)}, got {cfg.mixed_precision!r}")
    # sampling
    for name in ("height", "width"):
        value = getattr(cfg, name)
        if value < 16 or value % 16:
            raise ConfigError(name, f"must be a positive multiple of 16, got {value}")
    if cfg.frames < 1 or (cfg.frames - 1) % 4:
        raise ConfigError("frames", f"must be 4k+1 (1, 5, ..., 81), got {cfg.frames}")
    if cfg.guidance_scale < 1:
        raise ConfigError("guidance_scale", f"must be >= 1 (1 = no CFG), got {cfg.guidance_scale}")
    if cfg.shift <= 0:
        raise ConfigError("shift", f"must be > 0, got {cfg.shift}")
    if not (0 < cfg.boundary < 1):
        raise ConfigError("boundary", f"must be in (0, 1) (0.875 text-to-video, 0.9 image-to-video/InP), got {cfg.boundary}")
    # backprop window (the step ranges need the sampler's schedule)
    if cfg.backprop_strategy not in STRATEGIES:
        raise ConfigError("backprop_strategy", f"must be 'tail' or 'random', got {cfg.backprop_strategy!r}")
    from .sampler import expert_step_range  # light: no model code

    first, last = expert_step_range(cfg.inference_steps, cfg.shift, cfg.boundary, cfg.expert)
    n_range = last - first
    if n_range <= 0:
        raise ConfigError("boundary", f"with inference_steps={cfg.inference_steps}, shift={cfg.shift} and "
                          f"boundary={cfg.boundary} the {cfg.expert}-noise expert gets no step")
    if cfg.backprop_steps > n_range:
        raise ConfigError("backprop_steps", f"is {cfg.backprop_steps} but the {cfg.expert}-noise expert has only "
                          f"{n_range} steps (indices {first}..{last - 1})")
    if cfg.backprop_strategy == "random" and not (1 <= cfg.backprop_random_last <= n_range):
        raise ConfigError("backprop_random_last", f"must be in 1..{n_range} (the {cfg.expert}-noise expert's steps), "
                          f"got {cfg.backprop_random_last}")
    if cfg.decoded_latents > cfg.latent_frames:
        raise ConfigError("decoded_latents", f"is {cfg.decoded_latents} but {cfg.frames} frames give only "
                          f"{cfg.latent_frames} latent frames")
    if cfg.reward_frames is not None:
        decoded = 1 + 4 * (cfg.decoded_latents - 1)
        if not (1 <= cfg.reward_frames <= decoded):
            raise ConfigError("reward_frames", f"must be in 1..{decoded} (frames decoded from "
                              f"{cfg.decoded_latents} latents) or null, got {cfg.reward_frames}")
    # checkpoints, validation, guards
    for name in ("checkpoint_every", "validation_every", "ema_last_checkpoints", "sample_every"):
        if getattr(cfg, name) < 0:
            raise ConfigError(name, f"must be >= 0, got {getattr(cfg, name)}")
    if cfg.checkpoints_keep < 1:
        raise ConfigError("checkpoints_keep", f"must be >= 1, got {cfg.checkpoints_keep}")
    if cfg.ema_last_checkpoints > cfg.checkpoints_keep:
        raise ConfigError("ema_last_checkpoints", f"is {cfg.ema_last_checkpoints} but only checkpoints_keep="
                          f"{cfg.checkpoints_keep} checkpoints are kept: raise checkpoints_keep")
    if cfg.validation_every and not (cfg.validation_prompts or cfg.validation_prompts_file):
        raise ConfigError("validation_prompts", "is empty but validation_every > 0: give held-out prompts")
    if cfg.gaming_guard not in GAMING_GUARDS:
        raise ConfigError("gaming_guard", f"must be one of {', '.join(GAMING_GUARDS)}, got {cfg.gaming_guard!r}")
    if cfg.gaming_patience < 1:
        raise ConfigError("gaming_patience", f"must be >= 1, got {cfg.gaming_patience}")


def load_config(path: str | os.PathLike, check_files: bool = True) -> TrainConfig:
    """Read a YAML run config (safe_load) and validate it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("--config", f"file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError("--config", f"{path} is not valid YAML: {exc}") from exc
    if data is None:
        data = {}
    return config_from_dict(data, base_dir=path.parent, check_files=check_files)


def dump_config(cfg: TrainConfig) -> str:
    """YAML text of a config (what the node writes, and what the trainer records)."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def read_prompt_file(path: str, field_name: str) -> list[str]:
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(field_name, f"cannot read {path}: {exc}") from exc
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise ConfigError(field_name, f"{path} holds no prompt (one prompt per line)")
    return prompts
