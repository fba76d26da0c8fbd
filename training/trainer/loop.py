"""The training loop: sample -> decode -> reward -> loss -> backward -> clipped step.

Per optimizer step and process: ``batch_size`` prompts drawn from the training prompts,
a trajectory sampled with gradients only in the backprop window (sampler.py), the chosen
latents decoded with gradients, ``loss = sum_i w_i (1 - reward_i) / sum_i w_i``, backward,
gradient clipping that applies (DeepSpeed ``gradient_clipping`` from ``max_grad_norm``, or
torch clipping without DeepSpeed), optimizer and LR-scheduler step. All randomness of a step
(prompts, noise, window) derives from (seed, step, micro-step, rank), so a resumed run
repeats exactly what an uninterrupted one does.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import time
from pathlib import Path

import torch

from ..safe_io import write_text
from .checkpoint import latest_checkpoint, load_checkpoint, recent_loras, save_checkpoint
from .config import ConfigError, TrainConfig, dump_config, read_prompt_file
from .lora import add_lora, lora_parameters, lora_state, native_modules
from .progress import EXIT_OK, Control, Progress
from .sampler import CFGDenoiser, backprop_window, make_schedule, sample

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": torch.float32}


# ---- set-up ---------------------------------------------------------------------------

def make_accelerator(cfg: TrainConfig):
    """accelerate.Accelerator; with DeepSpeed, our DeepSpeed JSON with the run's values."""
    from accelerate import Accelerator, DeepSpeedPlugin, InitProcessGroupKwargs

    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    handlers = [] if cuda or world == 1 else [InitProcessGroupKwargs(backend="gloo")]
    use_ds = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if not use_ds:
        accelerator = Accelerator(gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                                  mixed_precision="no", cpu=not cuda, kwargs_handlers=handlers)
        return accelerator, False
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
    ds["gradient_accumulation_steps"] = cfg.gradient_accumulation_steps
    ds["gradient_clipping"] = cfg.max_grad_norm  # really applied by the engine (0 = off)
    ds["zero_force_ds_cpu_optimizer"] = False  # our torch AdamW: no cpu_adam JIT build
    ds["bf16"] = {"enabled": cfg.mixed_precision == "bf16"}
    ds["fp16"] = {"enabled": cfg.mixed_precision == "fp16"}
    ds.setdefault("steps_per_print", 10 ** 9)
    plugin = DeepSpeedPlugin(hf_ds_config=ds)
    accelerator = Accelerator(deepspeed_plugin=plugin, kwargs_handlers=handlers,
                              gradient_accumulation_steps=cfg.gradient_accumulation_steps)
    return accelerator, True


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


def load_embeddings(cfg: TrainConfig, prompts: list[str], device) -> dict[str, torch.Tensor]:
    from .models import encode_prompts_umt5, read_prompt_embeddings

    if cfg.prompt_embeddings:
        return read_prompt_embeddings(cfg.prompt_embeddings)
    return encode_prompts_umt5(prompts, cfg.text_encoder, cfg.tokenizer, device, DTYPES[cfg.mixed_precision])


def load_rewards(specs, device, dtype, field_name: str):
    from ..rewards import load_reward_model

    models = []
    for i, spec in enumerate(specs):
        model = load_reward_model(spec.path, device=device, dtype=dtype, variant=spec.variant,
                                  preprocess=spec.preprocess or "reference")
        if not model.name.startswith(spec.model):
            raise ConfigError(f"{field_name}[{i}].model", f"is {spec.model!r} but {spec.path} is a {model.name} "
                              "checkpoint; fix model or path")
        model.requires_grad_(False)
        models.append((spec, model))
    return models


# ---- one step ------------------------------------------------------------------------

class RewardTrainer:
    """Holds the model stack and computes the reward loss of one micro-step."""

    def __init__(self, cfg: TrainConfig, experts: dict, vae, rewards, embeddings, train_prompts,
                 device, rank: int):
        self.cfg, self.experts, self.vae, self.rewards = cfg, experts, vae, rewards
        self.embeddings, self.train_prompts, self.device, self.rank = embeddings, train_prompts, device, rank
        self.schedule = make_schedule(cfg.inference_steps, cfg.shift, cfg.boundary)
        trained = experts[cfg.expert]
        core = getattr(trained, "module", trained)
        self.in_channels = core.config.in_channels
        self.dtype = DTYPES[cfg.mixed_precision]

    def _context(self, prompts: list[str]) -> torch.Tensor:
        from .models import pad_context

        return pad_context([self.embeddings[p].float() for p in prompts]).to(self.device)

    def trajectory(self, prompts: list[str], generator: torch.Generator, window) -> torch.Tensor:
        cfg = self.cfg
        batch = len(prompts)
        shape = (batch, 16, cfg.latent_frames, cfg.height // 8, cfg.width // 8)
        noise = torch.randn(shape, generator=generator).to(self.device)
        condition = None
        if self.in_channels == 36:  # InP text-to-video: 4 mask + 16 masked-video latent channels, all zero
            condition = torch.zeros(batch, 20, *shape[2:], device=self.device)
        elif self.in_channels != 16:
            raise ConfigError(f"{cfg.expert}_noise_model", f"expert has {self.in_channels} input channels; "
                              "supported: 16 (T2V) and 36 (I2V/Fun-InP)")
        negative = self._context([cfg.negative_prompt] * batch) if cfg.guidance_scale > 1 else None
        denoise = CFGDenoiser(self.experts, self._context(prompts), negative, cfg.guidance_scale,
                              condition, self.dtype)
        return sample(denoise, noise, self.schedule, window)

    def frames(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode the first ``decoded_latents`` latent frames -> [B, F, 3, H, W] in [0, 1]."""
        from .models import decode_latents

        video = decode_latents(self.vae, latents[:, :, : self.cfg.decoded_latents])
        video = video.permute(0, 2, 1, 3, 4)
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

    def step_inputs(self, step: int, micro: int) -> tuple[list[str], torch.Generator, tuple[int, int]]:
        cfg = self.cfg
        rng = random.Random(f"{cfg.seed}-{step}-{micro}-{self.rank}")
        prompts = [rng.choice(self.train_prompts) for _ in range(cfg.batch_size)]
        generator = torch.Generator().manual_seed(rng.randrange(2 ** 62))
        # the window is the same on every rank (ZeRO-3 needs the same forwards everywhere)
        window = backprop_window(self.schedule, cfg.expert, cfg.backprop_strategy, cfg.backprop_steps,
                                 cfg.backprop_random_last, random.Random(f"{cfg.seed}-{step}-{micro}-window"))
        return prompts, generator, window

    def loss(self, step: int, micro: int):
        prompts, generator, window = self.step_inputs(step, micro)
        latents = self.trajectory(prompts, generator, window)
        frames = self.frames(latents)
        scores = self.score(frames, prompts, self.rewards)
        total_weight = sum(spec.weight for spec, _ in self.rewards)
        loss = sum(spec.weight * (1 - scores[spec.name]).mean() for spec, _ in self.rewards) / total_weight
        weighted = sum(spec.weight * scores[spec.name].detach().mean() for spec, _ in self.rewards) / total_weight
        return loss, float(weighted), {k: float(v.detach().mean()) for k, v in scores.items()}, frames.detach()


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


def validate(trainer: RewardTrainer, held_out, prompts: list[str], seed: int) -> dict:
    """Score held-out prompts (no gradients): training rewards, held-out rewards, motion."""
    from ..rewards import motion_score
    from .models import decode_latents

    train_scores: dict[str, list[float]] = {}
    held_scores: dict[str, list[float]] = {}
    motions = []
    with torch.no_grad():
        for i, prompt in enumerate(prompts):
            generator = torch.Generator().manual_seed(seed + i)
            latents = trainer.trajectory([prompt], generator, None)
            video = decode_latents(trainer.vae, latents).permute(0, 2, 1, 3, 4)  # [1, F, 3, H, W]
            first = trainer.frames(latents)
            for name, value in trainer.score(first, [prompt], trainer.rewards).items():
                train_scores.setdefault(name, []).append(float(value))
            for name, value in trainer.score(first, [prompt], held_out).items():
                held_scores.setdefault(name, []).append(float(value))
            if video.shape[1] > 1:
                motions.append(float(motion_score(video[0])))
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    return {"rewards": {k: mean(v) for k, v in train_scores.items()},
            "held_out": {k: mean(v) for k, v in held_scores.items()},
            "motion": mean(motions) if motions else None}


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
    from PIL import Image

    paths = []
    for b in range(frames.shape[0]):
        for f in range(frames.shape[1]):
            array = (frames[b, f].permute(1, 2, 0).clamp(0, 1) * 255).round().byte().cpu().numpy()
            path = folder / f"sample-{step:06d}-{b}-{f}.png"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(array).save(path)
            paths.append(str(path))
    return paths


def average_loras(paths: list[Path]) -> dict[str, tuple]:
    """Post-hoc averaging of checkpoint LoRAs (mean of each up and down factor)."""
    from ..lora_format import read_lora

    sums: dict[str, list] = {}
    for path in paths:
        lora = read_lora(path)
        for native, parts in lora.modules.items():
            up, down = lora.tensors[parts["lora_up.weight"]].float(), lora.tensors[parts["lora_down.weight"]].float()
            alpha = float(lora.tensors[parts["alpha"]]) if "alpha" in parts else None
            entry = sums.setdefault(native, [torch.zeros_like(up), torch.zeros_like(down), alpha])
            entry[0] += up / len(paths)
            entry[1] += down / len(paths)
    return {k: tuple(v) for k, v in sums.items()}


def train(cfg: TrainConfig, progress: Progress, reward_loader=load_rewards) -> int:
    from ..lora_format import save_canonical_lora
    from .models import load_wan_expert, load_wan_vae

    accelerator, use_ds = make_accelerator(cfg)
    rank, world = accelerator.process_index, accelerator.num_processes
    progress.main = accelerator.is_main_process
    output = Path(cfg.output_dir)
    control = Control(output)
    if accelerator.is_main_process:
        output.mkdir(parents=True, exist_ok=True)
        control.clear_stale()
        write_text(output / "run_config.yaml", dump_config(cfg))
    control.install_signal_handlers()
    device = accelerator.device
    dtype = DTYPES[cfg.mixed_precision]
    torch.manual_seed(cfg.seed + rank)
    random.seed(cfg.seed + rank)

    train_prompts, val_prompts = resolve_prompts(cfg)
    embeddings = load_embeddings(cfg, train_prompts + val_prompts + [cfg.negative_prompt], device)

    # Our models are built whole and not partitioned at construction (transformers would
    # otherwise build the reward CLIP under zero.Init with empty parameters).
    with _no_zero_init(accelerator) if use_ds else contextlib.nullcontext():
        experts = {"high": load_wan_expert(cfg.high_noise_model, dtype),
                   "low": load_wan_expert(cfg.low_noise_model, dtype)}
        trained = experts[cfg.expert]
        adapted = add_lora(trained, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, cfg.lora_exclude)
        if cfg.gradient_checkpointing:
            trained.enable_gradient_checkpointing()
        other_name = "low" if cfg.expert == "high" else "high"
        experts[other_name] = experts[other_name].to(device)
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
    trainer = RewardTrainer(cfg, experts, vae, rewards, embeddings, train_prompts, device, rank)

    metadata = {"base_model": cfg.base_model_name or Path(cfg.high_noise_model if cfg.expert == "high"
                                                           else cfg.low_noise_model).name,
                "expert": cfg.expert, "rewards": json.dumps({s.name: s.weight for s in cfg.rewards}),
                "rank": str(cfg.lora_rank), "alpha": str(cfg.lora_alpha), "config_hash": cfg.config_hash(),
                "trainer": "wan-reward-lora reward backprop"}

    def write_lora(path: Path, step: int):
        state = lora_state(model)  # collective under ZeRO-3
        if accelerator.is_main_process:
            save_canonical_lora(path, native_modules(state, cfg.lora_alpha), {**metadata, "steps": str(step)})
        return path

    start = 0
    resumed_from = None
    if cfg.resume:
        found = latest_checkpoint(output)
        if found is not None:
            start = load_checkpoint(accelerator, model, optimizer, scheduler, found, use_ds)
            resumed_from = str(found)
    progress.emit("started", step=start, max_steps=cfg.max_steps, expert=cfg.expert, world_size=world,
                  output_dir=str(output), lora_path=str(cfg.lora_path), config_hash=cfg.config_hash(),
                  resumed_from=resumed_from, adapted_modules=len(adapted), deepspeed=use_ds,
                  gradient_clipping=float(model.gradient_clipping()) if use_ds else cfg.max_grad_norm,
                  memory_at_start_mb=round(_current_memory_mb(device), 1))

    saved = {"step": None}

    def checkpoint(step: int, reason: str):
        if saved["step"] == step:  # already saved at this step (e.g. periodic, then final)
            return
        saved["step"] = step
        path = save_checkpoint(accelerator, model, optimizer, scheduler, step, output,
                               lambda p: write_lora(p, step), cfg.checkpoints_keep, use_ds)
        write_lora(cfg.lora_path, step)
        progress.emit("checkpoint", step=step, path=str(path), lora_path=str(cfg.lora_path), reason=reason)

    def agreed(requests: dict) -> dict:
        """Every rank acts on a request any rank saw (files are read by rank 0 only)."""
        if world == 1:
            return requests
        flags = torch.tensor([float(requests[k]) for k in ("stop", "save_now", "sample_now")])
        flags = accelerator.reduce(flags.to(device), reduction="sum").cpu()
        return {k: bool(flags[i] > 0) for i, k in enumerate(("stop", "save_now", "sample_now"))}

    guard = GamingGuard(cfg.gaming_patience)
    best = {"score": None, "path": None}

    def run_validation(step: int) -> bool:
        """Validate, keep the best LoRA by the held-out criterion; True if the guard tripped."""
        result = validate(trainer, held_out, val_prompts, cfg.validation_seed)
        train_val = sum(result["rewards"].values()) / len(result["rewards"])
        held = sum(result["held_out"].values()) / len(result["held_out"]) if result["held_out"] else None
        criterion = held if held is not None else train_val
        improved = step > 0 and (best["score"] is None or criterion > best["score"])
        if improved:
            best["score"], best["path"] = criterion, cfg.best_lora_path
            write_lora(cfg.best_lora_path, step)
        warning = guard.update(train_val, held, result["motion"])
        progress.emit("validation", step=step, rewards=result["rewards"], held_out=result["held_out"],
                      motion=result["motion"], best=improved,
                      best_lora_path=str(best["path"]) if best["path"] else None)
        if warning:
            progress.emit("warning", step=step, message=warning)
        return guard.tripped

    if cfg.validation_every and val_prompts and start == 0:
        run_validation(0)  # the base model's scores: the reference for the guard
    sample_next = False
    reason = "completed"
    step = start
    started = time.time()
    while step < cfg.max_steps:
        t0 = time.time()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        losses, rewards_mean, per_reward = [], [], {}
        grad_norm = None
        for micro in range(cfg.gradient_accumulation_steps):
            with accelerator.accumulate(model):
                loss, weighted, scores, frames = trainer.loss(step, micro)
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
        if use_ds:
            norm = model.get_global_grad_norm()
            grad_norm = None if norm is None else float(norm)
        scheduler.step()
        step += 1
        if sample_next or (cfg.sample_every and step % cfg.sample_every == 0):
            if accelerator.is_main_process:
                progress.emit("sample", step=step, paths=_save_pngs(frames, output / "samples", step))
            sample_next = False
        metrics = torch.tensor([sum(losses) / len(losses), sum(rewards_mean) / len(rewards_mean)]
                               + [sum(v) / len(v) for v in per_reward.values()], device=device)
        metrics = accelerator.reduce(metrics, reduction="mean").cpu() if world > 1 else metrics.cpu()
        seconds = time.time() - t0
        done = step - start
        progress.emit("step", step=step, max_steps=cfg.max_steps, loss=float(metrics[0]), reward=float(metrics[1]),
                      rewards={k: float(metrics[2 + i]) for i, k in enumerate(per_reward)},
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

    ema_path = None
    if cfg.ema_last_checkpoints > 1 and accelerator.is_main_process:
        loras = recent_loras(output, cfg.ema_last_checkpoints)
        if len(loras) > 1:
            ema_path = save_canonical_lora(cfg.ema_lora_path, average_loras(loras),
                                           {**metadata, "steps": str(step), "averaged_checkpoints": str(len(loras))})
    progress.emit("finished", step=step, reason=reason, lora_path=str(cfg.lora_path),
                  best_lora_path=str(best["path"]) if best["path"] else None,
                  ema_lora_path=str(ema_path) if ema_path else None)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return EXIT_OK

