"""Preference reward models (HPS v2.1, MPS) for scoring and differentiable training.

Public API::

    model = load_reward_model(path, device="cpu", dtype=torch.float32, variant=None)
    model.name                       # "hps_v2.1" or "mps"
    model.score(frames, prompts)     # [B] float32, differentiable w.r.t. frames, higher = better
    motion_score(frames)             # float, mean absolute frame difference x100
"""

from .base import RewardModel
from .motion import motion_per_step, motion_score
from .preprocess import PREPROCESS_MODES
from .registry import EXPECTED_FILES, load_reward_model, read_state_dict

__all__ = ["RewardModel", "load_reward_model", "motion_score", "motion_per_step", "read_state_dict",
           "EXPECTED_FILES", "PREPROCESS_MODES"]
