"""The training sampler: flow-matching Euler over two Wan experts with a backprop window.

One trajectory from pure noise (t = 1000) to the clean latent:
- the timesteps/sigmas come from diffusers' FlowMatchEulerDiscreteScheduler (shift, the
  same double-shifted endpoints as the reference trainer: 14 of 40 steps are high-noise at
  shift 5 / boundary 0.9);
- each step uses the high-noise expert while t >= boundary * 1000, the low-noise one after;
- classifier-free guidance runs the negative and positive prompts as one batch of 2B and
  splits the prediction with ``chunk(2)`` (correct for any batch size);
- only the steps inside the backprop window run with gradients. Steps before it and after
  it run under ``torch.no_grad``; the final latent is returned as
  ``x_window_out + (x_final - x_window_out).detach()`` (straight-through), so the reward's
  gradient reaches the window's output as an identity, exactly as in the reference trainer
  where later predictions are detached, but without keeping any graph after the window.

The Euler update ``x + (sigma_next - sigma) * v`` is written here because the scheduler's
``step()`` keeps an internal step counter and we run parts of the loop with and without
gradients and must resume at any index.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class Schedule:
    timesteps: torch.Tensor  # [N] float, 1000 .. ~0
    sigmas: torch.Tensor  # [N + 1] float, 1 .. 0
    experts: list[str]  # "high" | "low" per step

    @property
    def steps(self) -> int:
        return len(self.timesteps)


def make_schedule(steps: int, shift: float, boundary: float) -> Schedule:
    from diffusers.schedulers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    scheduler.set_timesteps(steps, device="cpu")
    timesteps = scheduler.timesteps.float().clone()
    sigmas = scheduler.sigmas.float().clone()
    experts = ["high" if float(t) >= boundary * 1000 else "low" for t in timesteps]
    return Schedule(timesteps, sigmas, experts)


def expert_range(schedule: Schedule, expert: str) -> tuple[int, int]:
    """[first, last) step indices handled by ``expert`` (high first, then low: the
    timesteps fall monotonically); (n, n) when it has none."""
    n_high = schedule.experts.count("high")
    return (0, n_high) if expert == "high" else (n_high, schedule.steps)


def expert_step_range(steps: int, shift: float, boundary: float, expert: str) -> tuple[int, int]:
    """[first, last) step indices handled by ``expert`` for these settings."""
    return expert_range(make_schedule(steps, shift, boundary), expert)


def backprop_window(schedule: Schedule, expert: str, strategy: str, num_steps: int,
                    random_last: int, rng: random.Random) -> tuple[int, int]:
    """[start, end) of the steps run with gradients, inside ``expert``'s range.

    tail: the last ``num_steps`` steps of the range (DRaFT-K; the reference: 1 step, i.e.
    step 39/40 for the low-noise expert and 13/40 for the high-noise expert).
    random: one step drawn among the last ``random_last`` steps of the range (AlignProp).
    """
    first, last = expert_range(schedule, expert)
    if last <= first:
        raise ValueError(f"the {expert}-noise expert has no step in this schedule")
    if strategy == "tail":
        return max(first, last - num_steps), last
    if strategy == "random":
        choice = rng.randrange(max(first, last - random_last), last)
        return choice, choice + 1
    raise ValueError(f"unknown backprop strategy {strategy!r}")


class CFGDenoiser:
    """Velocity of one step: expert choice, InP condition, classifier-free guidance.

    ``experts`` maps "high"/"low" to callables with diffusers' WanTransformer3DModel
    signature (the trained one may be a DeepSpeed/accelerate wrapper).
    ``context``/``negative_context``: [B, L, D] text embeddings (padded).
    ``condition``: [B, C, T, H, W] concatenated to the latent channels (InP: 20 zero
    channels), or None.
    """

    def __init__(self, experts: dict[str, Callable], context: torch.Tensor,
                 negative_context: torch.Tensor | None, guidance_scale: float,
                 condition: torch.Tensor | None, dtype: torch.dtype):
        self.experts = experts
        self.guidance = guidance_scale
        self.cfg = guidance_scale > 1.0 and negative_context is not None
        self.context = torch.cat([negative_context, context]) if self.cfg else context
        self.condition = condition
        self.dtype = dtype

    def __call__(self, x: torch.Tensor, t: torch.Tensor, expert: str) -> torch.Tensor:
        inp = torch.cat([x, x]) if self.cfg else x
        if self.condition is not None:
            cond = torch.cat([self.condition, self.condition]) if self.cfg else self.condition
            inp = torch.cat([inp, cond], dim=1)
        timestep = t.to(x.device).expand(inp.shape[0])
        out = self.experts[expert](hidden_states=inp.to(self.dtype), timestep=timestep,
                                   encoder_hidden_states=self.context.to(self.dtype),
                                   return_dict=False)[0].float()
        if not self.cfg:
            return out
        uncond, cond = out.chunk(2)
        return uncond + self.guidance * (cond - uncond)


def _euler(x: torch.Tensor, v: torch.Tensor, schedule: Schedule, i: int) -> torch.Tensor:
    return x + (schedule.sigmas[i + 1] - schedule.sigmas[i]).to(x.device) * v


def sample(denoise: Callable[[torch.Tensor, torch.Tensor, str], torch.Tensor], noise: torch.Tensor,
           schedule: Schedule, window: tuple[int, int] | None,
           step_callback: Callable[[int], None] | None = None) -> torch.Tensor:
    """Run the whole trajectory; gradients only inside ``window`` (None: no gradients)."""
    start, end = window if window is not None else (schedule.steps, schedule.steps)
    x = noise.float()
    with torch.no_grad():
        for i in range(start):
            x = _euler(x, denoise(x, schedule.timesteps[i], schedule.experts[i]), schedule, i)
            if step_callback:
                step_callback(i)
    if window is None:
        return x
    x = x.detach()
    with torch.enable_grad():
        for i in range(start, end):
            x = _euler(x, denoise(x, schedule.timesteps[i], schedule.experts[i]), schedule, i)
            if step_callback:
                step_callback(i)
    window_out = x
    with torch.no_grad():
        y = window_out.detach()
        for i in range(end, schedule.steps):
            y = _euler(y, denoise(y, schedule.timesteps[i], schedule.experts[i]), schedule, i)
            if step_callback:
                step_callback(i)
    # straight-through: value of the full trajectory, gradient of an identity to window_out
    return window_out + (y - window_out).detach()

