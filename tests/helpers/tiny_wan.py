"""Tiny Wan2.2 experts with the real key layout, built by the tests themselves.

``tiny_wan_state_dict`` returns a ComfyUI/original-format ("native") state dict of
a Wan transformer with the same keys and shape relations as a Wan2.2 A14B expert
(dim 5120, 40 blocks, in_dim 16 or 36), only smaller. Random weights, fixed seed.
"""

from __future__ import annotations

import torch


# The builder lives in training/tiny_models.py (the demo and bench use it too).
from training.tiny_models import TINY, linear_module_names, tiny_config, tiny_wan_state_dict  # noqa: E402,F401


def random_lora(state_dict: dict[str, torch.Tensor], modules: list[str], rank: int = 4,
                alpha: float | None = 2.0, seed: int = 1) -> dict[str, tuple]:
    """{native module: (up [out, r], down [r, in], alpha or None)} for the given modules."""
    gen = torch.Generator().manual_seed(seed)
    lora = {}
    for module in modules:
        out_features, in_features = state_dict[module + ".weight"].shape[:2]
        up = torch.randn(out_features, rank, generator=gen) * 0.1
        down = torch.randn(rank, in_features, generator=gen) * 0.1
        lora[module] = (up, down, alpha)
    return lora


def expected_weight(base: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
                    alpha: float | None, strength: float) -> torch.Tensor:
    """W + strength * alpha/rank * up @ down, computed here independently of the pack."""
    rank = down.shape[0]
    scale = 1.0 if alpha is None else alpha / rank
    return base.float() + strength * scale * (up.float() @ down.float())
