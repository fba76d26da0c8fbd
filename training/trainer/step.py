"""One micro-step of reward backpropagation: sample a trajectory (gradients only in the backprop
window, sampler.py), decode the chosen latents, score them, and the loss
``sum_i w_i (1 - reward_i) / sum_i w_i`` (+ the motion term). All randomness of a step (prompts,
noise, window, start image) derives from (seed, step, micro-step, rank): a resumed run repeats
exactly what an uninterrupted one does without any saved RNG state."""

from __future__ import annotations

import random

import torch

from .components import DTYPES
from .config import TrainConfig
from .sampler import CFGDenoiser, backprop_window, make_schedule, sample


def step_rng(seed: int, step: int, micro: int, rank: int) -> random.Random:
    """The random draws (prompts, noise seed) of one micro-step of one rank: derived, never saved."""
    return random.Random(f"{seed}-{step}-{micro}-{rank}")


class RewardStep:
    placement = None  # placement.Placement: low memory brings the VAE and rewards to the GPU when used
    """Holds the model stack and computes the reward loss of one micro-step.

    ``trained`` is the trained expert's model (or its DeepSpeed / accelerate wrapper), whose LoRA
    the motion term switches off for the base trajectory. ``start_images`` /
    ``validation_images``: I2V / Fun-InP start images (conditioning.StartImages) or None for
    the reference's all-zero conditioning. Training sample k (counted over steps, micro-steps,
    ranks and the batch) uses start image k mod N."""

    def __init__(self, cfg: TrainConfig, experts: dict, vae, rewards, embeddings, train_prompts, device,
                 rank: int, world: int = 1, accumulation: int = 1, start_images=None, validation_images=None,
                 placement=None):
        self.cfg, self.experts, self.vae, self.rewards = cfg, experts, vae, rewards
        self.placement = placement
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

        if self.placement is not None:
            self.placement.bring(self.vae)
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
        if self.placement is not None:
            for _, model in rewards:
                self.placement.bring(model)
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
