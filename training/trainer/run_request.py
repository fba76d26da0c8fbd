"""What the Reward LoRA Train node asks for, turned into the run's config (no ComfyUI here).

The node resolves its inputs to files and values (``TrainRequest``: every field typed and
named), and ``plan_run`` builds the run from them: the recipe's values, the request's on top,
each reward's kind read from its file's keys, and the variant / preprocessing the recipe uses
for that kind unless the request names one. The plan says what the request sets on top of the
recipe (written into run.yaml and shown on the node), the effective batch (batch x accumulation
x processes) and warnings, such as an effective batch other than the recipe's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import yaml

from ..safe_io import UserFileError
from .config import ConfigError, TrainConfig, config_from_dict, resolve_accumulation
from .recipes import RECIPES, complete_reward, overrides

FROM_RECIPE = "recipe"  # a choice input that follows the recipe


@dataclass(frozen=True)
class RewardChoice:
    path: str
    weight: float = 1.0
    variant: str = FROM_RECIPE  # MPS: official | videox_fun
    preprocess: str = FROM_RECIPE  # reference | squash
    input_name: str = "reward_model"  # the node input it came from (named in errors)


@dataclass(frozen=True)
class TrainRequest:
    recipe: str
    expert: str  # FROM_RECIPE, high, low or both
    high_noise_model: str
    low_noise_model: str
    vae: str
    rewards: tuple[RewardChoice, ...]
    output_dir: str
    output_name: str
    processes: int
    cpu: bool
    prompts: tuple[str, ...] = ()
    prompt_embeddings: str | None = None
    base_model_name: str = ""
    lora_rank: int = 128
    lora_alpha: float = 64.0
    max_steps: int = 3000
    learning_rate: float = 1e-5
    batch_size: int = 1
    gradient_accumulation_steps: int = 0
    width: int = 256
    height: int = 256
    frames: int = 81
    backprop_steps: int = 1
    inference_steps: int = 40
    guidance_scale: float = 6.0
    shift: float = 5.0
    boundary: float = 0.9
    seed: int = 42
    checkpoint_every: int = 100
    resume: bool = True
    init_lora: str | None = None
    start_images: str | None = None
    # the options node
    held_out_rewards: tuple[RewardChoice, ...] = ()
    validation_prompts: tuple[str, ...] = ()
    validation_every: int = 0
    validation_start_images: str | None = None
    gaming_guard: str = "warn"
    gaming_patience: int = 2
    sample_every: int = 0
    average_last_checkpoints: int = 0
    motion_weight: float = 0.0
    memory: str = "auto"


@dataclass
class RunPlan:
    config: TrainConfig
    on_top: dict  # the run.yaml mapping: recipe, then every value that is not the recipe's
    header: list[str]  # run.yaml's comment lines: what is set on top of the recipe, and why
    overrides: dict  # field -> (recipe's value, the run's)
    processes: int
    accumulation: int
    recipe_batch: int | None
    warnings: list[str] = field(default_factory=list)
    memory_reason: str = ""

    @property
    def run_yaml(self) -> str:
        """What the trainer reads: the recipe, then the request's values on top."""
        return "\n".join(self.header) + "\n" + yaml.safe_dump(self.on_top, sort_keys=False)

    def yaml_for(self, phase: TrainConfig) -> str:
        """run.yaml of one phase of the run (phases.phase_configs): the same values, the phase's expert,
        folder and LoRA name."""
        changes = {k: getattr(phase, k) for k in ("expert", "output_dir", "output_name", "frozen_expert_lora",
                                                  "frozen_expert_lora_strength") if getattr(phase, k) != getattr(
                                                      self.config, k)}
        header = self.header + ([f"# Phase {phase.expert} of expert: both."] if changes else [])
        return "\n".join(header) + "\n" + yaml.safe_dump({**self.on_top, **changes}, sort_keys=False)

    @property
    def effective_batch(self) -> int:
        return self.config.batch_size * self.accumulation * self.processes

    def summary(self) -> str:
        """The lines the node shows before training starts."""
        cfg = self.config
        lines = [f"recipe {cfg.recipe}, expert {cfg.expert}; effective batch {self.effective_batch} = batch "
                 f"{cfg.batch_size} x accumulation {self.accumulation} x {self.processes} process(es)"
                 + (f" (the recipe's: {self.recipe_batch})" if self.recipe_batch else "")]
        if self.memory_reason:
            lines.append(f"memory: {self.on_top.get('memory', cfg.memory)}: {self.memory_reason}")
        if self.overrides:
            lines.append("set on top of the recipe: " + ", ".join(
                f"{k} {_short(a)} -> {_short(b)}" for k, (a, b) in self.overrides.items()))
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def _short(value) -> str:
    if isinstance(value, list) and value and isinstance(value[0], dict):
        return "[" + ", ".join(f"{r.get('model')} x{r.get('weight', 1.0):g}" for r in value) + "]"
    return repr(value)


def _reward_spec(choice: RewardChoice) -> dict:
    from ..rewards.registry import checkpoint_kind

    try:  # the kind from the file's keys, never its name
        kind = checkpoint_kind(choice.path)
    except UserFileError as exc:
        raise ConfigError(choice.input_name, str(exc)) from None
    spec = {"model": kind, "path": choice.path, "weight": float(choice.weight)}
    if choice.variant != FROM_RECIPE and kind == "mps":
        spec["variant"] = choice.variant
    if choice.preprocess != FROM_RECIPE:
        spec["preprocess"] = choice.preprocess
    return spec


_REQUEST_FIELDS = ("high_noise_model", "low_noise_model", "vae", "prompt_embeddings", "base_model_name", "lora_rank",
                   "lora_alpha", "max_steps", "learning_rate", "batch_size", "gradient_accumulation_steps", "width",
                   "height", "frames", "backprop_steps", "inference_steps", "guidance_scale", "shift", "boundary",
                   "seed", "checkpoint_every", "resume", "init_lora", "start_images", "validation_every",
                   "validation_start_images", "gaming_guard", "gaming_patience", "sample_every",
                   "average_last_checkpoints", "motion_weight", "output_dir", "output_name", "memory")


def plan_run(request: TrainRequest) -> RunPlan:
    """The run of ``request``: validated (every value and every file's contents) before anything
    starts; ConfigError names the config field or the node input."""
    values = {name: getattr(request, name) for name in _REQUEST_FIELDS}
    values = {k: v for k, v in values.items() if v is not None}
    values.update(recipe=request.recipe, rewards=[_reward_spec(r) for r in request.rewards],
                  held_out_rewards=[_reward_spec(r) for r in request.held_out_rewards],
                  mixed_precision="no" if request.cpu else "bf16", gradient_checkpointing=not request.cpu)
    if request.expert != FROM_RECIPE:
        values["expert"] = request.expert
    if request.prompts:
        values["prompts"] = list(request.prompts)
    if request.validation_prompts:
        values["validation_prompts"] = list(request.validation_prompts)
    values["rewards"] = [complete_reward(request.recipe, r) for r in values["rewards"]]
    values["held_out_rewards"] = [complete_reward(request.recipe, r) for r in values["held_out_rewards"]]
    cfg = config_from_dict(values)
    accumulation = resolve_accumulation(cfg, request.processes)  # refuses a batch the processes cannot form
    changed = overrides(values)
    # mixed precision and checkpointing follow the device (CPU: float32, no checkpointing), not the recipe
    device_fields = {k: changed.pop(k) for k in ("mixed_precision", "gradient_checkpointing") if k in changed}
    effective = cfg.batch_size * accumulation * request.processes
    recipe_batch = RECIPES[request.recipe].get("effective_batch")
    warnings = []
    if recipe_batch and effective != recipe_batch:
        warnings.append(f"the effective batch is {effective} (batch {cfg.batch_size} x accumulation {accumulation} x "
                        f"{request.processes} process(es)) but recipe {request.recipe} trains at {recipe_batch}; set "
                        "gradient_accumulation to 0 to form the recipe's batch")
    kinds = [r["model"] for r in values["rewards"]]
    recipe_kinds = [r["model"] for r in RECIPES[request.recipe]["rewards"]]
    if request.recipe.startswith("videox_fun") and kinds != recipe_kinds:
        warnings.append(f"recipe {request.recipe} trains with {recipe_kinds} but the reward models are {kinds}: this "
                        "is not the reference run")
    header = [f"# Reward LoRA run: recipe {request.recipe}, then these values on top of it."]
    if changed:
        header.append("# Set on top of the recipe by the node: " + ", ".join(
            f"{k}: {_short(a)} -> {_short(b)}" for k, (a, b) in changed.items()))
    if device_fields:
        header.append("# For the device: " + ", ".join(f"{k}: {b!r}" for k, (_, b) in device_fields.items()))
    on_top = {k: v for k, v in values.items() if k not in RECIPES[request.recipe] or k in changed
              or k in device_fields or k == "rewards" or k == "held_out_rewards"}
    return RunPlan(cfg, on_top, header, changed, request.processes, accumulation, recipe_batch, warnings)


def preset_shape(preset: str, cpu: bool):
    """What a launcher preset's DeepSpeed JSON does with the trained expert (memory_estimate.DeepSpeedShape)."""
    import json
    from pathlib import Path

    from .launcher import PACK_ROOT, preset_config_file
    from .memory_estimate import DeepSpeedShape

    accelerate_file = preset_config_file(preset, cpu=cpu)
    if accelerate_file is None:
        return DeepSpeedShape()
    ds_file = (yaml.safe_load(Path(accelerate_file).read_text()).get("deepspeed_config") or {}).get(
        "deepspeed_config_file")
    zero = json.loads((PACK_ROOT / ds_file).read_text()).get("zero_optimization", {}) if ds_file else {}
    return DeepSpeedShape(stage=int(zero.get("stage", 0)),
                          offload_param=zero.get("offload_param", {}).get("device", "none") != "none",
                          offload_optimizer=zero.get("offload_optimizer", {}).get("device", "none") != "none")


def choose_memory(plan: RunPlan, preset: str, cpu: bool, gpu_gib: float | None, host_gib: float | None) -> tuple[str, str]:
    """The memory mode the node launches (``plan``'s request, auto resolved) and the DeepSpeed preset it
    launches with (``none`` for low, which runs one process without DeepSpeed); the choice is written
    into run.yaml and the plan. ``gpu_gib``: the GPU memory the trainer will have (None on CPU)."""
    from .memory_estimate import run_size
    from .placement import decide

    shape = preset_shape("none" if plan.config.memory == "low" else preset, cpu)
    decision = decide(run_size(plan.config), plan.config.memory, plan.processes, plan.processes, shape, gpu_gib,
                      host_gib)
    plan.on_top["memory"] = decision.mode
    plan.header.append(f"# memory: {decision.mode}: {decision.reason}")
    plan.memory_reason = decision.reason
    if decision.mode == "low" and preset != "none":
        plan.warnings.append(f"memory mode low runs one process without DeepSpeed: the preset {preset} is not used")
        preset = "none"
    return decision.mode, preset
