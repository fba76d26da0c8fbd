"""The trainer's run configuration: every field declared once, with its type, default, allowed
values and a one-line doc (``option(...)`` below). Validation, the ComfyUI node's defaults and
ranges, and the config reference in ``docs/training-config.md`` (``python -m
training.trainer.config --markdown``) all come from these declarations.

A run config is one flat YAML mapping (``yaml.safe_load``), written by hand or by the ComfyUI
"Reward LoRA Train" node. ``recipe: <name>`` starts from a recipe's values (recipes.py) and the
other fields of the mapping are set on top of it. Everything is checked before any model
loads: first each field's type and range (all errors together), then the relations between
fields, then every model file's contents (input_files.py). Each error is a ``ConfigError``
naming the field, the value and what to do. Paths may be relative to the YAML file's folder.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REWARD_MODELS = ("hps", "mps", "pickscore", "aesthetic")  # rewards/registry.py REWARD_KINDS
# MPS variants: "official" scorer (threshold 0.3, ~100 x cosine) or the reference's training reward
# (threshold 0.01, plain cosine); "seed" is the old name of "videox_fun"
REWARD_VARIANTS = ("official", "videox_fun")
REWARD_PREPROCESS = ("reference", "squash")
DEPRECATED_KEYS = {"ema_last_checkpoints": "average_last_checkpoints"}  # old key -> new field


class ConfigError(ValueError):
    """A run configuration value is missing or wrong; ``field`` names it (the first one when
    several are wrong: ``errors`` holds every (field, message))."""

    def __init__(self, field_name: str, message: str, errors: list[tuple[str, str]] | None = None):
        self.errors = errors or [(field_name, message)]
        super().__init__("; ".join(f"config field '{f}': {m}" for f, m in self.errors))
        self.field = field_name


@dataclass(frozen=True)
class Spec:
    """What one config field accepts. ``kind``: int, float, bool, str, choice, path (a file,
    required), path? (a file or null), str_list, str_list? (or null), int? (or null), rewards,
    targets ("all_linear" or a list of module suffixes)."""

    kind: str
    doc: str
    group: str
    choices: tuple = ()
    ge: float | None = None  # value >= ge
    gt: float | None = None  # value > gt
    le: float | None = None  # value <= le
    lt: float | None = None  # value < lt
    required: bool = False
    folder: bool = False  # a path? that names a folder, not a file


def option(default, kind: str, doc: str, *, group: str, **spec):
    """A dataclass field with its Spec (in the field's metadata); ``default`` may be a factory."""
    spec_obj = Spec(kind=kind, doc=doc, group=group, **spec)
    if callable(default):
        return field(default_factory=default, metadata={"spec": spec_obj})
    return field(default=default, metadata={"spec": spec_obj})


# one declaring function per group of the reference (docs/training-config.md)
_models, _prompts, _rewards, _lora, _optimisation, _sampling, _backprop, _outputs, _guards = (
    functools.partial(option, group=g) for g in ("models", "prompts", "rewards", "lora", "optimisation", "sampling",
                                                 "backprop", "outputs", "guards"))


@dataclass
class RewardSpec:
    model: str
    path: str
    weight: float = 1.0
    variant: str | None = None  # MPS only: official (default) | videox_fun
    preprocess: str | None = None  # reference (default) | squash

    @property
    def name(self) -> str:
        return self.model if not self.variant else f"{self.model}-{self.variant}"


@dataclass
class TrainConfig:
    recipe: str | None = _models(None, "choice", "recipe whose values the other fields are set on top of "
                                 "(recipes.py); recorded for the run",
                                 choices=("videox_fun_low_hps", "videox_fun_high_mps", "recommended"))
    expert: str = _models("low", "choice", "which expert's LoRA to train; both: the high-noise LoRA, then the "
                         "low-noise LoRA sampling with it (two runs, see phases.py)", choices=("high", "low", "both"))
    high_noise_model: str = _models("", "path", "ComfyUI diffusion_models file of the high-noise expert", required=True)
    low_noise_model: str = _models("", "path", "the same for the low-noise expert (both are needed: every "
                                  "trajectory crosses the boundary)", required=True)
    vae: str = _models("", "path", "Wan2.1 VAE, ComfyUI vae-folder format", required=True)
    prompt_embeddings: str | None = _models(None, "path?", "precomputed umT5 embeddings (safetensors, written by "
                                           "models.write_prompt_embeddings)")
    text_encoder: str | None = _models(None, "path?", "umt5-xxl encoder (ComfyUI text_encoders format)")
    tokenizer: str | None = _models(None, "path?", "folder of the umt5 tokenizer; not needed for ComfyUI's umt5 "
                                   "files, which embed theirs", folder=True)
    base_model_name: str = _models("", "str", "recorded in the LoRA metadata")
    init_lora: str | None = _models(None, "path?", "a LoRA (any key format the loader reads) the trained LoRA "
                                   "starts from; its rank and alpha are used, its modules must be the targets")
    frozen_expert_lora: str | None = _models(None, "path?", "a LoRA merged into the other (frozen) expert for "
                                            "sampling, e.g. the high-noise reward LoRA when training the low one")
    frozen_expert_lora_strength: float = _models(1.0, "float", "strength of frozen_expert_lora", ge=-10, le=10)
    start_images: str | None = _models(None, "path?", "I2V / Fun-InP experts only: start images, one per training "
                                      "sample, cycled (a folder of images or a safetensors [N, 3, H, W] in [0, 1]); "
                                      "null: the reference's all-zero conditioning (text to video)")
    validation_start_images: str | None = _models(None, "path?", "start images of the validation prompts (the same "
                                                 "forms; prompt i uses image i mod N)")
    prompts: list[str] | None = _prompts(None, "str_list?", "training prompts (or prompts_file); with neither, all "
                                       "prompts of prompt_embeddings")
    prompts_file: str | None = _prompts(None, "path?", "a text file, one prompt per line (blank lines skipped)")
    negative_prompt: str = _prompts("", "str", "the reference trains with an empty negative prompt")
    validation_prompts: list[str] = _prompts(list, "str_list", "held-out prompts (never trained on)")
    validation_prompts_file: str | None = _prompts(None, "path?", "a text file of validation prompts")
    rewards: list[RewardSpec] = _rewards(list, "rewards", "[{model: hps|mps|pickscore|aesthetic, path, weight: 1.0, variant: "
                                       "official|videox_fun (MPS), preprocess: reference|squash}]; loss = "
                                       "sum_i w_i (1 - reward_i) / sum_i w_i", required=True)
    held_out_rewards: list[RewardSpec] = _rewards(list, "rewards", "the same form, scored on validation only, never "
                                                "optimised")
    lora_rank: int = _lora(128, "int", "LoRA rank (the official reward LoRAs: 128)", ge=1, le=4096)
    lora_alpha: float = _lora(64.0, "float", "LoRA alpha; scale alpha / rank (the official: 64)", gt=0, le=65536)
    lora_targets: Any = _lora("all_linear", "targets", "'all_linear' or native module suffixes, e.g. "
                               "[self_attn.q, cross_attn.k]")
    lora_exclude: list[str] = _lora(lambda: ["ffn"], "str_list", "substrings of native module paths to skip "
                                     "(the reference skips ffn)")
    learning_rate: float = _optimisation(1e-5, "float", "AdamW learning rate", gt=0, lt=1)
    optimizer: str = _optimisation("adamw", "choice", "torch AdamW; sgd: plain gradient descent (for checks and "
                                   "ablations: the step is -learning_rate x gradient)", choices=("adamw", "sgd"))
    adam_beta1: float = _optimisation(0.9, "float", "AdamW beta1", ge=0, lt=1)
    adam_beta2: float = _optimisation(0.999, "float", "AdamW beta2", ge=0, lt=1)
    adam_epsilon: float = _optimisation(1e-10, "float", "AdamW epsilon", gt=0)
    weight_decay: float = _optimisation(3e-2, "float", "AdamW weight decay", ge=0)
    lr_scheduler: str = _optimisation("constant", "choice", "diffusers LR schedule (stepped once per optimizer step)",
                               choices=("constant", "constant_with_warmup", "linear", "cosine"))
    lr_warmup_steps: int = _optimisation(0, "int", "warm-up steps of the schedule", ge=0)
    max_grad_norm: float = _optimisation(0.3, "float", "gradient clipping, really applied (DeepSpeed gradient_clipping or "
                                  "torch clipping); 0 = off", ge=0)
    max_steps: int = _optimisation(10000, "int", "optimizer steps; 0 writes the initial LoRA (e.g. init_lora) and stops",
                            ge=0)
    batch_size: int = _optimisation(1, "int", "prompts per process per micro-step", ge=1, le=64)
    gradient_accumulation_steps: int = _optimisation(1, "int", "micro-steps per optimizer step; 0 = as many as "
                                              "effective_batch needs with this many processes", ge=0, le=1024)
    effective_batch: int | None = _optimisation(None, "int?", "the batch per optimizer step the run is meant to have "
                                         "(batch_size x accumulation x processes); set by recipes", ge=1)
    seed: int = _optimisation(42, "int", "random seed of the training draws (prompts, noise, window)", ge=0)
    gradient_checkpointing: bool = _optimisation(True, "bool", "checkpoint the trained expert's blocks")
    mixed_precision: str = _optimisation("bf16", "choice", "compute precision ('no' = float32, CPU runs; fp16 only under "
                                  "DeepSpeed, which scales the loss)", choices=("bf16", "fp16", "no"))
    height: int = _sampling(256, "int", "training video height, a multiple of 16", ge=16)
    width: int = _sampling(256, "int", "training video width, a multiple of 16", ge=16)
    frames: int = _sampling(81, "int", "frames per video, 4k+1", ge=1)
    inference_steps: int = _sampling(40, "int", "denoising steps of a training trajectory", ge=1)
    guidance_scale: float = _sampling(6.0, "float", "classifier-free guidance (on when > 1)", ge=1)
    shift: float = _sampling(5.0, "float", "flow-matching schedule shift", gt=0)
    boundary: float = _sampling(0.9, "float", "expert switch at t = boundary x 1000 (0.875 T2V, 0.9 I2V / Fun-InP)",
                             gt=0, lt=1)
    backprop_strategy: str = _backprop("tail", "choice", "tail: the last backprop_steps steps of the expert's range "
                                    "(DRaFT-K); random: one step among its last backprop_random_last (AlignProp)",
                                    choices=("tail", "random"))
    backprop_steps: int = _backprop(1, "int", "steps run with gradients (tail)", ge=1)
    backprop_random_last: int = _backprop(5, "int", "random: draw among this many last steps", ge=1)
    decoded_latents: int = _backprop(1, "int", "latent frames decoded for the reward (1 = the first frame only)", ge=1)
    reward_frames: int | None = _backprop(None, "int?", "frames sampled evenly from the decoded ones (null = all)",
                                       ge=1)
    motion_weight: float = _backprop(0.0, "float", "weight of the motion-preserving term (0 = off): a hinge on the "
                                  "LoRA's frame-difference energy falling below the base model's", ge=0)
    motion_latents: int = _backprop(2, "int", "latent frames decoded for the motion term (>= 2)", ge=2)
    output_dir: str = _outputs("", "str", "everything of the run is written here", required=True)
    output_name: str = _outputs("reward_lora", "str", "LoRA file stem: <output_dir>/<output_name>.safetensors")
    checkpoint_every: int = _outputs(100, "int", "steps between checkpoints; 0 = only at the end / on request", ge=0)
    checkpoints_keep: int = _outputs(2, "int", "checkpoints kept (older ones are deleted)", ge=1)
    resume: bool = _outputs(True, "bool", "continue from <output_dir>/checkpoints/latest.json if present (refused if "
                          "the config changed outside checkpoint.RESUME_HARMLESS); false: start over, an earlier "
                          "checkpoints/ folder is renamed aside")
    validation_every: int = _guards(0, "int", "steps between validations; 0 = off (needs validation prompts)", ge=0)
    validation_seed: int = _guards(1234, "int", "noise seed of validation prompt i: validation_seed + i", ge=0)
    gaming_guard: str = _guards("warn", "choice", "what to do when the training reward rises while a held-out reward "
                               "or motion falls", choices=("warn", "stop", "off"))
    gaming_patience: int = _guards(2, "int", "validations in a row that must show it before warn / stop", ge=1)
    average_last_checkpoints: int = _guards(0, "int", ">1: also export the exact average of the last N checkpoint "
                                           "LoRAs (one LoRA of rank N x lora_rank)", ge=0)
    sample_every: int = _guards(0, "int", "steps between saving the decoded training frames as PNG (0 = off)", ge=0)
    preflight: bool = _guards(True, "bool", "check GPUs and memory before loading models")
    memory: str = _guards("auto", "choice", "where the models live (docs/memory.md): fast (the frozen expert whole on "
                          "each GPU), sharded (it too partitioned across the GPUs), low (one GPU: both experts "
                          "stream from host memory), auto (the fastest that fits)",
                          choices=("auto", "fast", "sharded", "low"))

    # ---- derived -------------------------------------------------------------------------
    @property
    def lora_path(self) -> Path:
        return Path(self.output_dir) / f"{self.output_name}.safetensors"

    @property
    def best_lora_path(self) -> Path:
        return Path(self.output_dir) / f"{self.output_name}_best.safetensors"

    @property
    def average_lora_path(self) -> Path:
        return Path(self.output_dir) / f"{self.output_name}_average.safetensors"

    @property
    def latent_frames(self) -> int:
        return (self.frames - 1) // 4 + 1

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def config_hash(self) -> str:
        """sha256 (16 hex) of the settings that shape the LoRA (not output paths or run control)."""
        data = self.to_dict()
        for key in ("output_dir", "resume", "preflight", "checkpoint_every", "checkpoints_keep", "recipe", "memory"):
            data.pop(key, None)
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(TrainConfig)}


def spec(name: str) -> Spec:
    """The declaration of config field ``name``."""
    return FIELDS[name].metadata["spec"]


def default(name: str):
    """The default value of config field ``name``."""
    f = FIELDS[name]
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


# ---- per-field checks --------------------------------------------------------------------

def _range_text(s: Spec) -> str:
    parts = []
    for bound, op in ((s.ge, ">="), (s.gt, ">"), (s.le, "<="), (s.lt, "<")):
        if bound is not None:
            parts.append(f"{op} {bound:g}")
    return " and ".join(parts)


def _check_number(name: str, value, s: Spec):
    integer = s.kind in ("int", "int?")
    if isinstance(value, bool) or not isinstance(value, (int,) if integer else (int, float)):
        raise ConfigError(name, f"must be {'an integer' if integer else 'a number'}, got {value!r}")
    if not integer and not math.isfinite(value):
        raise ConfigError(name, f"must be a finite number, got {value!r}")
    for bound, ok in ((s.ge, lambda b: value >= b), (s.gt, lambda b: value > b),
                      (s.le, lambda b: value <= b), (s.lt, lambda b: value < b)):
        if bound is not None and not ok(bound):
            raise ConfigError(name, f"must be {_range_text(s)}, got {value}")
    return value if integer else float(value)


def _string_list(name: str, value) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(name, f"must be a list of strings, got {value!r}")
    return list(value)


_REWARD_KEYS = ("model", "path", "weight", "variant", "preprocess")


def _reward_spec(where: str, item) -> RewardSpec:
    if isinstance(item, RewardSpec):
        item = dataclasses.asdict(item)
    if not isinstance(item, dict):
        raise ConfigError(where, f"must be a mapping like {{model: hps, path: HPS_v2.1.pt}}, got {item!r}")
    unknown = set(item) - set(_REWARD_KEYS)
    if unknown:
        raise ConfigError(f"{where}.{sorted(unknown)[0]}", f"unknown key (allowed: {', '.join(_REWARD_KEYS)})")
    model = item.get("model")
    if model not in REWARD_MODELS:
        raise ConfigError(f"{where}.model", f"must be one of {', '.join(REWARD_MODELS)}, got {model!r}")
    path = item.get("path")
    if not isinstance(path, str) or not path:
        raise ConfigError(f"{where}.path", f"must be the reward model's checkpoint file, got {path!r}")
    weight = _check_number(f"{where}.weight", item.get("weight", 1.0), Spec("float", "", "", ge=0))
    variant = item.get("variant")
    if variant == "seed":
        warnings.warn(f"{where}.variant 'seed' is the old name of 'videox_fun'", DeprecationWarning, stacklevel=2)
        variant = "videox_fun"
    if variant is not None and (variant not in REWARD_VARIANTS or model != "mps"):
        raise ConfigError(f"{where}.variant", f"must be null or, for MPS, one of {', '.join(REWARD_VARIANTS)} "
                          f"(official: the single-image scorer, ~100 x cosine; videox_fun: the reference's training "
                          f"reward, plain cosine), got {variant!r} for {model}")
    preprocess = item.get("preprocess")
    if preprocess not in (None,) + REWARD_PREPROCESS:
        raise ConfigError(f"{where}.preprocess", f"must be 'reference' (the reward model's own resize and pad), "
                          f"'squash' (the reference trainer's 224x224 stretch) or null, got {preprocess!r}")
    return RewardSpec(model=model, path=path, weight=weight, variant=variant, preprocess=preprocess)


def coerce(name: str, value):
    """``value`` checked against field ``name``'s declaration (type, range, choices)."""
    s = spec(name)
    kind = s.kind
    if value is None and (kind.endswith("?") or (kind == "choice" and default(name) is None)):
        return None
    if kind in ("int", "float", "int?"):
        return _check_number(name, value, s)
    if kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(name, f"must be true or false, got {value!r}")
        return value
    if kind == "str":
        if not isinstance(value, str):
            raise ConfigError(name, f"must be a string, got {value!r}")
        return value
    if kind == "choice":
        if value not in s.choices:
            raise ConfigError(name, f"must be one of {', '.join(map(str, s.choices))}, got {value!r}")
        return value
    if kind in ("path", "path?"):
        if not isinstance(value, str) or not value:
            raise ConfigError(name, f"must be a {'folder' if s.folder else 'file'} path, got {value!r}")
        return value
    if kind == "str_list?":
        return _string_list(name, value)
    if kind == "str_list":
        return _string_list(name, value if value is not None else [])
    if kind == "rewards":
        if value is None:
            return []
        if not isinstance(value, list):
            raise ConfigError(name, f"must be a list of {{model, path, weight}} mappings, got {value!r}")
        return [_reward_spec(f"{name}[{i}]", item) for i, item in enumerate(value)]
    if kind == "targets":
        return value if value == "all_linear" else _string_list(name, value)
    raise AssertionError(f"unknown kind {kind!r} of {name}")


def config_from_dict(data: dict, base_dir: str | os.PathLike | None = None,
                     check_files: bool = True) -> TrainConfig:
    """Build and validate a TrainConfig (a recipe's values first, ``data`` on top); relative
    paths resolve against ``base_dir``."""
    from .recipes import apply_recipe

    if not isinstance(data, dict):
        raise ConfigError("<root>", f"the config must be a mapping of field: value, got {type(data).__name__}")
    data = dict(data)
    for old, new in DEPRECATED_KEYS.items():
        if old in data:
            warnings.warn(f"config key {old!r} is deprecated: use {new!r}", DeprecationWarning, stacklevel=2)
            data.setdefault(new, data.pop(old))
    unknown = [k for k in data if k not in FIELDS]
    if unknown:
        key = str(unknown[0])
        close = [f for f in FIELDS if f.split("_")[0] == key.split("_")[0]]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(key, f"unknown field{hint}; see docs/training-config.md for every field")
    if data.get("recipe") is not None:
        coerce("recipe", data["recipe"])
    values: dict[str, Any] = apply_recipe(data)
    errors: list[tuple[str, str]] = []
    for key in list(values):
        try:
            values[key] = coerce(key, values[key])
        except ConfigError as exc:
            errors += exc.errors
    if errors:
        raise ConfigError(errors[0][0], errors[0][1], errors)
    cfg = TrainConfig(**values)
    if base_dir is not None:
        _resolve_paths(cfg, Path(base_dir))
    validate(cfg, check_files=check_files)
    return cfg


def _resolve_paths(cfg: TrainConfig, base: Path) -> None:
    names = [n for n in FIELDS if spec(n).kind in ("path", "path?")] + ["output_dir"]
    for name in names:
        value = getattr(cfg, name)
        if value and not os.path.isabs(os.path.expanduser(value)):
            setattr(cfg, name, str(base / value))
        elif value:
            setattr(cfg, name, os.path.expanduser(value))
    for reward in cfg.rewards + cfg.held_out_rewards:
        if not os.path.isabs(os.path.expanduser(reward.path)):
            reward.path = str(base / reward.path)


# ---- relations between fields --------------------------------------------------------------

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
        for name in [n for n in FIELDS if spec(n).kind == "path?"]:
            value = getattr(cfg, name)
            if not value:
                continue
            if spec(name).folder or name.endswith("start_images"):
                if not os.path.exists(value):
                    raise ConfigError(name, f"not found: {value}")
            elif not os.path.isfile(value):
                raise ConfigError(name, f"file not found: {value}")
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
        for i, reward in enumerate(getattr(cfg, group)):
            if check_files and not os.path.isfile(reward.path):
                raise ConfigError(f"{group}[{i}].path", f"file not found: {reward.path}")
    if cfg.lora_targets != "all_linear" and not cfg.lora_targets:
        raise ConfigError("lora_targets", "is empty: use 'all_linear' or a list like ['self_attn.q', 'cross_attn.k']")
    if cfg.effective_batch is not None and cfg.gradient_accumulation_steps == 0:
        resolve_accumulation(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    elif cfg.gradient_accumulation_steps == 0:
        raise ConfigError("gradient_accumulation_steps", "0 (automatic) needs effective_batch (the batch to form)")
    # sampling
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
    # checkpoints, validation, guards
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
    if check_files:  # last: the values are sound, now the files' contents
        from .input_files import check_input_files

        check_input_files(cfg)


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


# ---- files ------------------------------------------------------------------------------------

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
    """YAML text of a config (what the trainer records)."""
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


# ---- the reference, generated -------------------------------------------------------------------

_KIND_TEXT = {"int": "int", "float": "float", "bool": "bool", "str": "str", "choice": "choice", "path": "file",
              "path?": "file or null", "str_list": "list of str", "str_list?": "list of str or null",
              "int?": "int or null", "rewards": "list of rewards", "targets": "all_linear or list of str"}


def markdown_reference() -> str:
    """The config reference (docs/training-config.md) from the declarations."""
    lines = ["# Trainer config reference", "",
             "Generated from `training/trainer/config.py` by `python -m training.trainer.config --markdown`; "
             "a test keeps this file equal to it. `recipe: <name>` starts from a recipe's values "
             "(`training/trainer/recipes.py`, [recipes](training.md#recipes)); the fields you set go on top.", ""]
    group = None
    for name, f in FIELDS.items():
        s = spec(name)
        if s.group != group:
            group = s.group
            lines += ["", f"## {group.capitalize()}", "", "| field | type | default | allowed | meaning |",
                      "|---|---|---|---|---|"]
        kind = _KIND_TEXT[s.kind] + (" (folder)" if s.folder else "")
        allowed = ", ".join(map(str, s.choices)) if s.choices else _range_text(s)
        value = "required" if s.required else json.dumps(default(name))
        lines.append(f"| `{name}` | {kind} | {value} | {allowed} | {s.doc} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if sys.argv[1:] == ["--markdown"]:
        sys.stdout.write(markdown_reference())
    else:
        sys.exit("usage: python -m training.trainer.config --markdown")
