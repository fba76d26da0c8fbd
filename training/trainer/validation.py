"""Validation and the guards against reward hacking: held-out prompts scored with fixed noise, the
gaming guard, and what the best LoRA is chosen by."""

from __future__ import annotations

import torch

from .config import TrainConfig
from .distributed import StepFault, guarded


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


def validate(trainer, held_out, prompts: list[str], seed: int, rank: int = 0, world: int = 1,
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
            video = trainer.decode(latents, latents.shape[2])  # once: the reward frames are its first ones
            if not counted or fault:
                continue
            first = trainer.reward_frames(video)
            result, fault = guarded(lambda: (trainer.score(first, [prompts[i]], trainer.rewards),  # noqa: B023
                                             trainer.score(first, [prompts[i]], held_out)))  # noqa: B023
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
