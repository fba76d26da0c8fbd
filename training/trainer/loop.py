"""The training loop: sample -> decode -> reward -> loss -> backward -> clipped step.

Per optimizer step and process: ``batch_size`` prompts drawn from the training prompts,
a trajectory sampled with gradients only in the backprop window (sampler.py), the chosen
latents decoded with gradients, ``loss = sum_i w_i (1 - reward_i) / sum_i w_i``, backward,
gradient clipping that applies (DeepSpeed ``gradient_clipping`` from ``max_grad_norm``, or
torch clipping without DeepSpeed), optimizer and LR-scheduler step. All randomness of a step
(prompts, noise, window) derives from (seed, step, micro-step, rank), validation noise from
validation_seed, and the LoRA's initial weights from seed: a resumed run repeats exactly what
an uninterrupted one does without any saved RNG state.

Under ZeRO-3 every forward and every LoRA gather is a collective: all ranks run the same
number of forwards, and decisions that lead to one (a new best LoRA, the gaming guard, stop /
save requests) are made on rank 0's numbers and broadcast, so every rank acts together.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import time
from pathlib import Path

import torch

from ..safe_io import UserFileError, atomic_write, write_text
from .checkpoint import (
    check_resumable,
    checkpoints_dir,
    latest_checkpoint,
    load_checkpoint,
    move_aside,
    read_run_info,
    recent_loras,
    save_checkpoint,
)
from .config import ConfigError, TrainConfig, dump_config, read_prompt_file, resolve_accumulation
from .conditioning import StartImages, read_start_images
from .lora import add_lora, lora_parameters, lora_state, native_modules, set_lora_weights, target_modules
from .progress import EXIT_ERROR, EXIT_OK, TRAINER_TAG, Control, Progress
from .sampler import CFGDenoiser, backprop_window, make_schedule, sample

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": torch.float32}


# ---- set-up ---------------------------------------------------------------------------

def make_accelerator(cfg: TrainConfig):
    """(accelerate.Accelerator, uses DeepSpeed, micro-steps per optimizer step); with DeepSpeed, our
    DeepSpeed JSON with the run's values."""
    from accelerate import Accelerator, DeepSpeedPlugin, InitProcessGroupKwargs

    world = int(os.environ.get("WORLD_SIZE", "1"))
    accumulation = resolve_accumulation(cfg, world)
    cuda = torch.cuda.is_available()
    handlers = [] if cuda or world == 1 else [InitProcessGroupKwargs(backend="gloo")]
    use_ds = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if cfg.mixed_precision == "fp16" and not use_ds:
        # fp16 backward needs loss scaling, which only DeepSpeed's fp16 engine provides here
        raise ConfigError("mixed_precision", "fp16 needs DeepSpeed (its dynamic loss scaling) and this run has no "
                          "DeepSpeed: use bf16 (or 'no' on CPU), or launch with a DeepSpeed accelerate config "
                          "such as training/configs/accelerate_zero3_offload.yaml")
    if not use_ds:
        accelerator = Accelerator(gradient_accumulation_steps=accumulation,
                                  mixed_precision="no", cpu=not cuda, kwargs_handlers=handlers)
        return accelerator, False, accumulation
    import deepspeed.ops

    if not cuda:
        # The shared-memory comm op serves inference only and would be JIT-compiled at start.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    from .preflight import deepspeed_config_path

    with open(deepspeed_config_path(), encoding="utf-8") as handle:
        ds = json.load(handle)
    ds.pop("optimizer", None)
    ds.pop("scheduler", None)
    ds.pop("train_batch_size", None)
    ds["train_micro_batch_size_per_gpu"] = cfg.batch_size
    ds["gradient_accumulation_steps"] = accumulation
    ds["gradient_clipping"] = cfg.max_grad_norm  # really applied by the engine (0 = off)
    ds["zero_force_ds_cpu_optimizer"] = False  # our torch AdamW: no cpu_adam JIT build
    ds["bf16"] = {"enabled": cfg.mixed_precision == "bf16"}
    ds["fp16"] = {"enabled": cfg.mixed_precision == "fp16"}
    ds.setdefault("steps_per_print", 10 ** 9)
    plugin = DeepSpeedPlugin(hf_ds_config=ds)
    accelerator = Accelerator(deepspeed_plugin=plugin, kwargs_handlers=handlers,
                              gradient_accumulation_steps=accumulation)
    return accelerator, True, accumulation


@contextlib.contextmanager
def _no_zero_init(accelerator):
    """Build models whole: transformers would construct them under zero.Init (empty params)."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        accelerator.state.deepspeed_plugin.set_deepspeed_weakref()


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
            variant = {"videox_fun": "seed"}.get(spec.variant, spec.variant)  # the rewards package's name
            model = load_reward_model(spec.path, device=device, dtype=dtype, variant=variant,
                                      preprocess=spec.preprocess or "reference")
        except UserFileError as exc:
            raise ConfigError(f"{field_name}[{i}].path", str(exc)) from exc
        if not model.name.startswith(spec.model):
            raise ConfigError(f"{field_name}[{i}].model", f"is {spec.model!r} but {spec.path} is a {model.name} "
                              "checkpoint; fix model or path")
        model.requires_grad_(False)
        models.append((spec, model))
    return models


# ---- one step ------------------------------------------------------------------------

def step_rng(seed: int, step: int, micro: int, rank: int) -> random.Random:
    """The random draws (prompts, noise seed) of one micro-step of one rank: derived, never saved."""
    return random.Random(f"{seed}-{step}-{micro}-{rank}")


class StepFault(RuntimeError):
    """A fault on one or more ranks that every rank knows of (raised on all ranks together)."""


def agree_on_fault(local: str | None, accelerator, world: int) -> str | None:
    """Collective: every rank learns whether any rank faulted, and what each said. Called by every
    rank at the same point, before the next collective a faulted rank would not reach."""
    if world == 1:
        return f"rank 0: {local}" if local else None
    flag = torch.tensor([1.0 if local else 0.0], device=accelerator.device)
    if float(accelerator.reduce(flag, reduction="sum").item()) == 0:
        return None
    messages: list = [None] * world
    torch.distributed.all_gather_object(messages, local)
    return "; ".join(f"rank {r}: {m}" for r, m in enumerate(messages) if m)


def guarded(compute):
    """Run ``compute()``; an exception becomes a fault text (the rank carries on to agree with the others)."""
    try:
        return compute(), None
    except Exception as exc:  # every fault of a step: the ranks must stop together, not hang
        return None, f"{type(exc).__name__}: {exc}"


class RewardTrainer:
    """Holds the model stack and computes the reward loss of one micro-step.

    ``trained`` is the trained expert's model (or its DeepSpeed / accelerate wrapper), whose LoRA
    the motion term switches off for the base trajectory. ``start_images`` /
    ``validation_images``: I2V / Fun-InP start images (conditioning.StartImages) or None for
    the reference's all-zero conditioning. Training sample k (counted over steps, micro-steps,
    ranks and the batch) uses start image k mod N."""

    def __init__(self, cfg: TrainConfig, experts: dict, vae, rewards, embeddings, train_prompts, device,
                 rank: int, world: int = 1, accumulation: int = 1, start_images=None, validation_images=None):
        self.cfg, self.experts, self.vae, self.rewards = cfg, experts, vae, rewards
        self.embeddings, self.train_prompts, self.device, self.rank = embeddings, train_prompts, device, rank
        self.world, self.accumulation = world, accumulation
        self.start_images, self.validation_images = start_images, validation_images
        self.schedule = make_schedule(cfg.inference_steps, cfg.shift, cfg.boundary)
        core = getattr(experts[cfg.expert], "module", experts[cfg.expert])
        self.in_channels = core.config.in_channels
        self.dtype = DTYPES[cfg.mixed_precision]

    def _context(self, prompts: list[str]) -> torch.Tensor:
        from .models import pad_context

        return pad_context([self.embeddings[p].float() for p in prompts]).to(self.device)

    def noise(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        cfg = self.cfg
        shape = (batch, 16, cfg.latent_frames, cfg.height // 8, cfg.width // 8)
        return torch.randn(shape, generator=generator).to(self.device)

    def condition(self, batch: int, images, indices: list[int]) -> torch.Tensor | None:
        """The InP channels (None for T2V experts): start images' conditioning, or zeros."""
        from .conditioning import zero_condition

        if self.in_channels != 36:
            return None
        if images is None:
            return zero_condition(batch, self.cfg.latent_frames, self.cfg.height, self.cfg.width, self.device)
        return images.condition(self.vae, indices, self.device)

    def trajectory(self, prompts: list[str], noise: torch.Tensor, window, condition=None) -> torch.Tensor:
        cfg = self.cfg
        negative = self._context([cfg.negative_prompt] * len(prompts)) if cfg.guidance_scale > 1 else None
        denoise = CFGDenoiser(self.experts, self._context(prompts), negative, cfg.guidance_scale, condition, self.dtype)
        return sample(denoise, noise, self.schedule, window)

    def decode(self, latents: torch.Tensor, count: int) -> torch.Tensor:
        """The first ``count`` latent frames decoded: [B, 3, 1 + 4 (count - 1), H, W] in [0, 1]."""
        from .models import decode_latents

        return decode_latents(self.vae, latents[:, :, :count])

    def reward_frames(self, video: torch.Tensor) -> torch.Tensor:
        """Decoded frames [B, 3, F', H, W] (of the first ``decoded_latents`` latents or more) ->
        the frames the reward scores, [B, F, 3, H, W]. The Wan VAE decodes causally, so the
        first 1 + 4 (k - 1) frames of a longer decode are those of the first k latents."""
        video = video[:, :, : 1 + 4 * (self.cfg.decoded_latents - 1)].permute(0, 2, 1, 3, 4)
        if self.cfg.reward_frames is not None:
            index = torch.linspace(0, video.shape[1] - 1, self.cfg.reward_frames).round().long()
            video = video[:, index]
        return video

    def score(self, frames: torch.Tensor, prompts: list[str], rewards) -> dict[str, torch.Tensor]:
        """{reward name: [B]} mean over frames."""
        b, f = frames.shape[:2]
        flat = frames.reshape(b * f, *frames.shape[2:])
        repeated = [p for p in prompts for _ in range(f)]
        return {spec.name: model.score(flat, repeated).float().view(b, f).mean(1) for spec, model in rewards}

    def step_inputs(self, step: int, micro: int) -> tuple[list[str], torch.Generator, tuple[int, int], list[int]]:
        """Prompts, noise generator, backprop window and start-image indices of one micro-step."""
        cfg = self.cfg
        rng = step_rng(cfg.seed, step, micro, self.rank)
        prompts = [rng.choice(self.train_prompts) for _ in range(cfg.batch_size)]
        generator = torch.Generator().manual_seed(rng.randrange(2 ** 62))
        # the window is the same on every rank (ZeRO-3 needs the same forwards everywhere)
        window = backprop_window(self.schedule, cfg.expert, cfg.backprop_strategy, cfg.backprop_steps,
                                 cfg.backprop_random_last, random.Random(f"{cfg.seed}-{step}-{micro}-window"))
        first = ((step * self.accumulation + micro) * self.world + self.rank) * cfg.batch_size
        return prompts, generator, window, list(range(first, first + cfg.batch_size))

    def motion_term(self, video: torch.Tensor, prompts: list[str], noise: torch.Tensor, condition) -> torch.Tensor:
        """The motion-preserving hinge: this trajectory's decoded ``motion_latents`` against the base
        model's (LoRA off, no gradients) from the same noise, prompts and conditioning."""
        from ..rewards.motion import motion_hinge
        from .lora import adapters_disabled

        count = self.cfg.motion_latents
        with torch.no_grad(), adapters_disabled(self.experts[self.cfg.expert]):
            base = self.decode(self.trajectory(prompts, noise, None, condition), count)
        frames = video[:, :, : 1 + 4 * (count - 1)].permute(0, 2, 1, 3, 4)
        return motion_hinge(frames, base.permute(0, 2, 1, 3, 4))

    def loss(self, step: int, micro: int):
        """(loss, weighted reward, {reward: mean, motion_term: value}, reward frames) of one micro-step."""
        cfg = self.cfg
        prompts, generator, window, images = self.step_inputs(step, micro)
        noise = self.noise(len(prompts), generator)
        condition = self.condition(len(prompts), self.start_images, images)
        latents = self.trajectory(prompts, noise, window, condition)
        video = self.decode(latents, max(cfg.decoded_latents, cfg.motion_latents if cfg.motion_weight else 1))
        frames = self.reward_frames(video)
        if not bool(torch.isfinite(frames).all()):
            raise FloatingPointError(f"the decoded frames of prompt(s) {prompts} hold NaN or inf values (the LoRA "
                                     "diverged, or an input such as a prompt embedding is not finite)")
        scores = self.score(frames, prompts, self.rewards)
        bad = [name for name, value in scores.items() if not bool(torch.isfinite(value).all())]
        if bad:
            raise FloatingPointError(f"reward {bad[0]} is not finite for prompt(s) {prompts}")
        total_weight = sum(spec.weight for spec, _ in self.rewards)
        loss = sum(spec.weight * (1 - scores[spec.name]).mean() for spec, _ in self.rewards) / total_weight
        parts = {k: float(v.detach().mean()) for k, v in scores.items()}
        if cfg.motion_weight:
            term = self.motion_term(video, prompts, noise, condition)
            loss = loss + cfg.motion_weight * term
            parts["motion_term"] = float(term.detach())
        if not bool(torch.isfinite(loss)):
            raise FloatingPointError(f"the loss is {float(loss)} for prompt(s) {prompts}")
        weighted = sum(spec.weight * scores[spec.name].detach().mean() for spec, _ in self.rewards) / total_weight
        return loss, float(weighted), parts, frames.detach()


# ---- validation and guards ---------------------------------------------------------

class GamingGuard:
    """Flags the training reward rising while held-out rewards or motion fall."""

    def __init__(self, patience: int):
        self.patience, self.previous, self.strikes = patience, None, 0

    def update(self, train_reward: float, held_out: float | None, motion: float | None) -> str | None:
        message = None
        if self.previous is not None:
            p_train, p_held, p_motion = self.previous
            falling = []
            if held_out is not None and p_held is not None and held_out < p_held:
                falling.append(f"held-out reward {p_held:.4f} -> {held_out:.4f}")
            if motion is not None and p_motion is not None and motion < p_motion * 0.9:
                falling.append(f"motion {p_motion:.3f} -> {motion:.3f}")
            if train_reward > p_train and falling:
                self.strikes += 1
                message = (f"possible reward gaming: training reward {p_train:.4f} -> {train_reward:.4f} while "
                           + " and ".join(falling) + f" ({self.strikes}/{self.patience})")
            else:
                self.strikes = 0
        self.previous = (train_reward, held_out, motion)
        return message

    @property
    def tripped(self) -> bool:
        return self.strikes >= self.patience

    def state(self) -> dict:
        return {"previous": list(self.previous) if self.previous else None, "strikes": self.strikes}

    def load_state(self, state: dict) -> None:
        self.previous = tuple(state["previous"]) if state.get("previous") else None
        self.strikes = int(state.get("strikes", 0))


def validate(trainer: RewardTrainer, held_out, prompts: list[str], seed: int, rank: int = 0, world: int = 1,
             reduce_sum=lambda t: t, agree=lambda fault: fault) -> dict:
    """Score held-out prompts (no gradients): training rewards, held-out rewards, motion.

    Prompt i uses noise seed ``seed + i``. With several processes, rank r scores prompts
    r, r + world, ...; every rank runs the same number of trajectories (under ZeRO-3 each
    forward is a collective), a rank short of prompts repeats one and does not count it.
    ``reduce_sum`` sums a tensor over ranks; every rank gets the same means. A rank whose
    scoring fails goes on with the trajectories; ``agree`` (``agree_on_fault``) then tells every
    rank, and all raise ``StepFault`` together.
    """
    from ..rewards import motion_score
    from .models import decode_latents

    names = [spec.name for spec, _ in trainer.rewards]
    held_names = [spec.name for spec, _ in held_out]
    # [counted prompts, motion sum, motion count, training reward sums..., held-out sums...]
    sums = torch.zeros(3 + len(names) + len(held_names), dtype=torch.float64)
    mine = list(range(rank, len(prompts), world))
    rounds = -(-len(prompts) // world)
    fault = None
    with torch.no_grad():
        for n in range(rounds):
            counted = n < len(mine)
            i = mine[n] if counted else mine[-1] if mine else 0
            noise = trainer.noise(1, torch.Generator().manual_seed(seed + i))
            condition = trainer.condition(1, trainer.validation_images, [i])
            latents = trainer.trajectory([prompts[i]], noise, None, condition)
            video = decode_latents(trainer.vae, latents)  # once: the reward frames are its first ones
            if not counted or fault:
                continue
            first = trainer.reward_frames(video)
            result, fault = guarded(lambda: (trainer.score(first, [prompts[i]], trainer.rewards),
                                             trainer.score(first, [prompts[i]], held_out)))
            if fault:
                fault = f"validation of prompt {prompts[i]!r}: {fault}"
                continue
            scores, held = result
            sums[0] += 1
            if video.shape[2] > 1:
                sums[1] += float(motion_score(video.permute(0, 2, 1, 3, 4)[0]))
                sums[2] += 1
            for k, name in enumerate(names):
                sums[3 + k] += float(scores[name])
            for k, name in enumerate(held_names):
                sums[3 + len(names) + k] += float(held[name])
    agreed = agree(fault)
    if agreed:
        raise StepFault(agreed)
    sums = reduce_sum(sums)
    count = float(sums[0])
    return {"rewards": {name: float(sums[3 + k]) / count for k, name in enumerate(names)},
            "held_out": {name: float(sums[3 + len(names) + k]) / count for k, name in enumerate(held_names)},
            "motion": float(sums[1]) / float(sums[2]) if float(sums[2]) else None}


def selection_criterion(cfg: TrainConfig) -> str:
    """What the best LoRA is chosen by (also in the validation event)."""
    if cfg.held_out_rewards:
        return "mean of held_out_rewards (" + ", ".join(s.name for s in cfg.held_out_rewards) + ")"
    return ("mean of the training rewards (" + ", ".join(s.name for s in cfg.rewards) + ") on the validation "
            "prompts: no held_out_rewards are set")


# ---- the run ------------------------------------------------------------------------

def _peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _current_memory_mb(device) -> float:
    """Memory held now (GPU allocated, or this process's resident set on CPU)."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2 ** 20
    import psutil

    return psutil.Process().memory_info().rss / 2 ** 20


def _save_pngs(frames: torch.Tensor, folder: Path, step: int) -> list[str]:
    """Decoded frames as PNG files, each written atomically."""
    from PIL import Image

    paths = []
    for b in range(frames.shape[0]):
        for f in range(frames.shape[1]):
            array = (frames[b, f].permute(1, 2, 0).clamp(0, 1) * 255).round().byte().cpu().numpy()
            path = folder / f"sample-{step:06d}-{b}-{f}.png"
            image = Image.fromarray(array)
            atomic_write(path, lambda tmp, image=image: image.save(tmp, format="PNG"))
            paths.append(str(path))
    return paths


def average_loras(paths: list[Path]) -> dict[str, tuple]:
    """The average of k checkpoint LoRAs, exactly, as one LoRA of rank sum(r_i).

    mean_i(s_i B_i A_i) = U D with U = [s_1 B_1 ... s_k B_k] / k and D = [A_1; ...; A_k]
    (s_i = alpha_i / r_i, or 1 without alpha); alpha is set to the new rank so that the
    loader's scale alpha / rank is 1. Averaging up and down separately would be wrong:
    mean(B) mean(A) != mean(B A).
    """
    from ..lora_format import read_lora

    ups: dict[str, list] = {}
    downs: dict[str, list] = {}
    for path in paths:
        lora = read_lora(path)
        for native, parts in lora.modules.items():
            up, down = lora.tensors[parts["lora_up.weight"]].float(), lora.tensors[parts["lora_down.weight"]].float()
            scale = float(lora.tensors[parts["alpha"]]) / down.shape[0] if "alpha" in parts else 1.0
            ups.setdefault(native, []).append(up * scale / len(paths))
            downs.setdefault(native, []).append(down)
    out = {}
    for native in ups:
        if len(ups[native]) != len(paths):
            raise ValueError(f"module {native} is missing from some of the averaged LoRAs")
        up, down = torch.cat(ups[native], dim=1), torch.cat(downs[native], dim=0)
        out[native] = (up, down, float(down.shape[0]))
    return out


def _deepspeed_layout(model, params) -> dict:
    """ZeRO stage, offload devices and whether the LoRA parameters really are partitioned."""
    def device(offload) -> str:
        value = getattr(offload, "device", None) if offload is not None else None
        return str(getattr(value, "value", value or "none"))

    return {"zero_stage": int(model.zero_optimization_stage()),
            "offload_param_device": device(model.zero_offload_param()),
            "offload_optimizer_device": device(model.zero_offload_optimizer()),
            "lora_params_partitioned": bool(params) and all(hasattr(p, "ds_id") for p in params)}


def train(cfg: TrainConfig, progress: Progress, reward_loader=load_rewards) -> int:
    from accelerate.utils import broadcast

    from ..lora_format import save_canonical_lora
    from .models import load_wan_expert, load_wan_vae

    accelerator, use_ds, accumulation = make_accelerator(cfg)
    rank, world = accelerator.process_index, accelerator.num_processes
    progress.main = accelerator.is_main_process
    output = Path(cfg.output_dir)
    control = Control(output, read_files=accelerator.is_main_process)
    replaced = None
    if accelerator.is_main_process:
        output.mkdir(parents=True, exist_ok=True)
        control.clear_stale()
        if not cfg.resume:
            replaced = move_aside(output)  # starting over: never mix two runs' checkpoints
        write_text(output / "run_config.yaml", dump_config(cfg))
    accelerator.wait_for_everyone()
    control.install_signal_handlers()
    device = accelerator.device
    dtype = DTYPES[cfg.mixed_precision]

    train_prompts, val_prompts = resolve_prompts(cfg)
    embeddings = load_embeddings(cfg, train_prompts + val_prompts + [cfg.negative_prompt], device)

    # Our models are built whole and not partitioned at construction (transformers would
    # otherwise build the reward CLIP under zero.Init with empty parameters).
    with _no_zero_init(accelerator) if use_ds else contextlib.nullcontext():
        experts = {}
        other_name = "low" if cfg.expert == "high" else "high"
        for name in ("high", "low"):
            merge = (cfg.frozen_expert_lora, cfg.frozen_expert_lora_strength) \
                if name == other_name and cfg.frozen_expert_lora else None
            with file_field(f"{name}_noise_model" if merge is None else "frozen_expert_lora"):
                experts[name] = load_wan_expert(getattr(cfg, f"{name}_noise_model"), dtype, merge_lora=merge)
        trained = experts[cfg.expert]
        torch.manual_seed(cfg.seed)  # the LoRA's initial weights: the same on every rank
        adapted, lora_alpha = adapt(cfg, trained)
        if cfg.gradient_checkpointing:
            trained.enable_gradient_checkpointing()
        experts[other_name] = experts[other_name].to(device)
        with file_field("vae"):
            vae = load_wan_vae(cfg.vae, dtype).to(device)
        rewards = reward_loader(cfg.rewards, device, dtype, "rewards")
        held_out = reward_loader(cfg.held_out_rewards, device, dtype, "held_out_rewards")

    params = list(lora_parameters(trained).values())
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay)
    from diffusers.optimization import get_scheduler

    # not passed to accelerate: stepped once per optimizer step, whatever the process count
    scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                              num_training_steps=cfg.max_steps)
    if not use_ds:
        trained = trained.to(device)
    model, optimizer = accelerator.prepare(trained, optimizer)
    experts[cfg.expert] = model
    start_images, validation_images = (
        StartImages(read_start_images(path), cfg.height, cfg.width, cfg.frames) if path else None
        for path in (cfg.start_images, cfg.validation_start_images))
    trainer = RewardTrainer(cfg, experts, vae, rewards, embeddings, train_prompts, device, rank, world, accumulation,
                            start_images, validation_images)

    metadata = {"base_model": cfg.base_model_name or Path(cfg.high_noise_model if cfg.expert == "high"
                                                           else cfg.low_noise_model).name,
                "expert": cfg.expert, "rewards": json.dumps({s.name: s.weight for s in cfg.rewards}),
                "rank": str(cfg.lora_rank), "alpha": str(lora_alpha), "config_hash": cfg.config_hash(),
                "trainer": TRAINER_TAG}

    def write_lora(path: Path, step: int):
        state = lora_state(model)  # collective under ZeRO-3: every rank must call it
        if accelerator.is_main_process:
            save_canonical_lora(path, native_modules(state, lora_alpha), {**metadata, "steps": str(step)})
        return path

    guard = GamingGuard(cfg.gaming_patience)
    # the best validation score so far; the base model's (step 0) is a candidate, so a LoRA
    # worse than the base never becomes "best" (path None: the base is the best)
    best = {"score": None, "step": None, "path": None}

    start = 0
    resumed_from = None
    if cfg.resume:
        found = latest_checkpoint(output)
        stray = sorted(checkpoints_dir(output).glob("step-*"))
        if found is None and stray:
            raise ConfigError("resume", f"{stray[-1]} is not a checkpoint this trainer can resume (no run.json: "
                              "written by an older version, or damaged); set resume: false to start over (the "
                              "old checkpoints are moved aside)")
        if found is not None:
            info = read_run_info(found)
            check_resumable(cfg, info, world, found)
            start = load_checkpoint(accelerator, model, optimizer, scheduler, found, use_ds)
            best.update(info.get("best") or {})
            guard.load_state(info.get("guard") or {})
            resumed_from = str(found)
    started_fields = dict(step=start, max_steps=cfg.max_steps, expert=cfg.expert, world_size=world,
                          output_dir=str(output), lora_path=str(cfg.lora_path), config_hash=cfg.config_hash(),
                          resumed_from=resumed_from, replaced_checkpoints=str(replaced) if replaced else None,
                          adapted_modules=len(adapted), deepspeed=use_ds,
                          gradient_clipping=float(model.gradient_clipping()) if use_ds else cfg.max_grad_norm,
                          memory_at_start_mb=round(_current_memory_mb(device), 1), recipe=cfg.recipe,
                          batch_size=cfg.batch_size, gradient_accumulation_steps=accumulation,
                          effective_batch=cfg.batch_size * accumulation * world, lora_rank=cfg.lora_rank,
                          lora_alpha=lora_alpha, init_lora=cfg.init_lora, start_images=len(start_images or ()))
    if use_ds:
        started_fields.update(_deepspeed_layout(model, params))
    progress.emit("started", **started_fields)
    if cfg.init_lora and lora_alpha != cfg.lora_alpha:
        progress.emit("warning", step=start, message=f"lora_alpha {cfg.lora_alpha:g} replaced by init_lora's "
                      f"alpha {lora_alpha:g} ({cfg.init_lora}): a continued LoRA keeps its scale")
    if replaced:
        progress.emit("warning", step=start, message=f"resume: false: the earlier run's checkpoints were moved to "
                      f"{replaced}; this run starts over")

    saved = {"step": None}

    def checkpoint(step: int, reason: str):
        if saved["step"] == step:  # already saved at this step (e.g. periodic, then final)
            return
        saved["step"] = step
        run_info = {"config": cfg.to_dict(), "config_hash": cfg.config_hash(), "world_size": world,
                    "best": {**best, "path": str(best["path"]) if best["path"] else None}, "guard": guard.state()}
        path = save_checkpoint(accelerator, model, optimizer, scheduler, step, output,
                               lambda p: write_lora(p, step), cfg.checkpoints_keep, use_ds, run_info)
        write_lora(cfg.lora_path, step)
        progress.emit("checkpoint", step=step, path=str(path), lora_path=str(cfg.lora_path), reason=reason)

    def agreed(requests: dict) -> dict:
        """Every rank acts on a request any rank saw: flag files are read by rank 0 only,
        a signal may reach any rank; the sum over ranks is the same everywhere."""
        if world == 1:
            return requests
        flags = torch.tensor([float(requests[k]) for k in ("stop", "save_now", "sample_now")])
        flags = accelerator.reduce(flags.to(device), reduction="sum").cpu()
        return {k: bool(flags[i] > 0) for i, k in enumerate(("stop", "save_now", "sample_now"))}

    def reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
        if world == 1:
            return tensor
        return accelerator.reduce(tensor.float().to(device), reduction="sum").cpu().double()

    def stop_on_fault(fault: str, step: int) -> int:
        """Every rank got here together: save the last good step (when it is new), tell once, exit."""
        if step > start:
            checkpoint(step, "fault")
            kept = f"the last good step ({step}) is saved: checkpoint and LoRA {cfg.lora_path}"
        elif start:
            kept = f"no new step to save: the checkpoint of step {start} is kept"
        else:
            kept = "no step had completed, so nothing was saved"
        progress.emit("error", kind="runtime", field=None, step=step,
                      message=f"training stopped on every rank: {fault}. {kept}; fix the cause and start the run "
                              "again with resume on to continue from the last checkpoint")
        return EXIT_ERROR

    criterion_name = selection_criterion(cfg)

    def run_validation(step: int) -> bool:
        """Validate, keep the best LoRA by the criterion; True if the guard tripped. The
        decisions are rank 0's, broadcast, so every rank gathers the LoRA together."""
        result = validate(trainer, held_out, val_prompts, cfg.validation_seed, rank, world, reduce_sum,
                          lambda fault: agree_on_fault(fault, accelerator, world))
        train_val = sum(result["rewards"].values()) / len(result["rewards"])
        held = sum(result["held_out"].values()) / len(result["held_out"]) if result["held_out"] else None
        criterion = held if held is not None else train_val
        improved = best["score"] is None or criterion > best["score"]
        warning = guard.update(train_val, held, result["motion"])
        decisions = torch.tensor([float(improved), float(guard.tripped)], device=device)
        if world > 1:
            decisions = broadcast(decisions, from_process=0)
        improved, tripped = bool(decisions[0].item()), bool(decisions[1].item())
        if improved:
            best.update(score=criterion, step=step, path=cfg.best_lora_path if step > 0 else None)
            if step > 0:
                write_lora(cfg.best_lora_path, step)
        progress.emit("validation", step=step, rewards=result["rewards"], held_out=result["held_out"],
                      motion=result["motion"], best=improved and step > 0,
                      best_lora_path=str(best["path"]) if best["path"] else None,
                      criterion=criterion_name, criterion_value=criterion, best_score=best["score"],
                      best_step=best["step"])
        if warning:
            progress.emit("warning", step=step, message=warning)
        return tripped

    step = start
    try:
        if cfg.validation_every and val_prompts and start == 0:
            run_validation(0)  # the base model's scores: the guard's reference and the first best candidate
        sample_next = False
        reason = "completed"
        started = time.time()
        while step < cfg.max_steps:
            t0 = time.time()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            losses, rewards_mean, per_reward = [], [], {}
            grad_norm = None
            for micro in range(accumulation):
                with accelerator.accumulate(model):
                    result, fault = guarded(lambda: trainer.loss(step, micro))
                    fault = agree_on_fault(fault, accelerator, world)  # before the backward's collectives
                    if fault:
                        raise StepFault(f"step {step + 1}: {fault}")
                    loss, weighted, scores, frames = result
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        if not use_ds and cfg.max_grad_norm > 0:
                            grad_norm = float(accelerator.clip_grad_norm_(params, cfg.max_grad_norm))
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                losses.append(float(loss.detach()))
                rewards_mean.append(weighted)
                for k, v in scores.items():
                    per_reward.setdefault(k, []).append(v)
                del loss
            if use_ds:
                norm = model.get_global_grad_norm()
                grad_norm = None if norm is None else float(norm)
            scheduler.step()
            step += 1
            if sample_next or (cfg.sample_every and step % cfg.sample_every == 0):
                if accelerator.is_main_process:
                    progress.emit("sample", step=step, paths=_save_pngs(frames, output / "samples", step))
                sample_next = False
            del frames
            metrics = torch.tensor([sum(losses) / len(losses), sum(rewards_mean) / len(rewards_mean)]
                                   + [sum(v) / len(v) for v in per_reward.values()], device=device)
            metrics = accelerator.reduce(metrics, reduction="mean").cpu() if world > 1 else metrics.cpu()
            seconds = time.time() - t0
            done = step - start
            means = {k: float(metrics[2 + i]) for i, k in enumerate(per_reward)}
            motion = {"motion_term": means.pop("motion_term")} if "motion_term" in means else {}
            progress.emit("step", step=step, max_steps=cfg.max_steps, loss=float(metrics[0]), reward=float(metrics[1]),
                          rewards=means, **motion,
                          lr=scheduler.get_last_lr()[0], grad_norm=grad_norm, seconds=round(seconds, 4),
                          peak_memory_mb=round(_peak_memory_mb(device), 1),
                          eta_seconds=round((time.time() - started) / done * (cfg.max_steps - step), 1))

            if cfg.validation_every and step % cfg.validation_every == 0 and val_prompts:
                if run_validation(step) and cfg.gaming_guard == "stop":
                    reason = "gaming_guard"

            requests = agreed(control.poll())
            if requests["sample_now"]:
                sample_next = True
            if requests["stop"] or reason == "gaming_guard":
                checkpoint(step, "stop" if reason != "gaming_guard" else "gaming_guard")
                reason = reason if reason == "gaming_guard" else "stopped"
                break
            if requests["save_now"]:
                checkpoint(step, "save_now")
            elif cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                checkpoint(step, "periodic")
        else:
            checkpoint(step, "final")
    except StepFault as fault:
        return stop_on_fault(str(fault), step)

    average_path = None
    if cfg.average_last_checkpoints > 1 and accelerator.is_main_process:
        loras = recent_loras(output, cfg.average_last_checkpoints)
        if len(loras) > 1:
            average_path = save_canonical_lora(
                cfg.average_lora_path, average_loras(loras),
                {**metadata, "steps": str(step), "averaged_checkpoints": str(len(loras)),
                 "averaged_steps": ",".join(p.parent.name.split("-")[-1].lstrip("0") or "0" for p in loras),
                 "rank": str(cfg.lora_rank * len(loras)), "alpha": str(float(cfg.lora_rank * len(loras))),
                 "averaging": "exact average of the last checkpoints' LoRAs (not an EMA)"})
    progress.emit("finished", step=step, reason=reason, lora_path=str(cfg.lora_path),
                  best_lora_path=str(best["path"]) if best["path"] else None,
                  average_lora_path=str(average_path) if average_path else None)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return EXIT_OK
