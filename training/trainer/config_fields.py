"""The trainer's run configuration declared once: every field with its type, default, allowed
values and a one-line doc (``option(...)``), the ``TrainConfig`` they make, and ``ConfigError``.

Everything else about the config reads these declarations: the checks (config.py,
config_checks.py), the ComfyUI node's defaults and ranges, and docs/training-config.md.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REWARD_MODELS = ("hps", "mps", "pickscore", "aesthetic")  # = rewards/registry.py REWARD_KINDS (a test checks)
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
