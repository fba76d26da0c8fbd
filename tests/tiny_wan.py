"""Tiny Wan2.2 experts with the real key layout, built by the tests themselves.

``tiny_wan_state_dict`` returns a ComfyUI/original-format ("native") state dict of
a Wan transformer with the same keys and shape relations as a Wan2.2 A14B expert
(dim 5120, 40 blocks, in_dim 16 or 36), only smaller. Random weights, fixed seed.
"""

from __future__ import annotations

import math

import torch

from training.wan_names import ATTENTION_LINEARS, FFN_LINEARS

TINY = dict(dim=128, ffn_dim=256, num_layers=2, in_dim=36, out_dim=16, text_dim=4096,
            freq_dim=256, head_dim=128, patch_size=(1, 2, 2))


def tiny_config(**overrides) -> dict:
    config = dict(TINY)
    config.update(overrides)
    config["num_heads"] = config["dim"] // config["head_dim"]
    return config


def tiny_wan_state_dict(seed: int = 0, dtype=torch.float32, **overrides) -> dict[str, torch.Tensor]:
    c = tiny_config(**overrides)
    gen = torch.Generator().manual_seed(seed)
    dim, ffn = c["dim"], c["ffn_dim"]
    pt, ph, pw = c["patch_size"]

    def w(*shape):
        fan_in = shape[1] if len(shape) > 1 else shape[0]
        return (torch.randn(*shape, generator=gen) / math.sqrt(fan_in)).to(dtype)

    def b(n):
        return (torch.randn(n, generator=gen) * 0.02).to(dtype)

    sd: dict[str, torch.Tensor] = {
        "patch_embedding.weight": w(dim, c["in_dim"], pt, ph, pw),
        "patch_embedding.bias": b(dim),
        "text_embedding.0.weight": w(dim, c["text_dim"]), "text_embedding.0.bias": b(dim),
        "text_embedding.2.weight": w(dim, dim), "text_embedding.2.bias": b(dim),
        "time_embedding.0.weight": w(dim, c["freq_dim"]), "time_embedding.0.bias": b(dim),
        "time_embedding.2.weight": w(dim, dim), "time_embedding.2.bias": b(dim),
        "time_projection.1.weight": w(6 * dim, dim), "time_projection.1.bias": b(6 * dim),
        "head.head.weight": w(c["out_dim"] * pt * ph * pw, dim),
        "head.head.bias": b(c["out_dim"] * pt * ph * pw),
        "head.modulation": (torch.randn(1, 2, dim, generator=gen) / math.sqrt(dim)).to(dtype),
    }
    for i in range(c["num_layers"]):
        p = f"blocks.{i}."
        for name in ATTENTION_LINEARS:
            sd[p + name + ".weight"] = w(dim, dim)
            sd[p + name + ".bias"] = b(dim)
        for attn in ("self_attn", "cross_attn"):
            sd[p + attn + ".norm_q.weight"] = (1 + 0.1 * torch.randn(dim, generator=gen)).to(dtype)
            sd[p + attn + ".norm_k.weight"] = (1 + 0.1 * torch.randn(dim, generator=gen)).to(dtype)
        sd[p + "norm3.weight"] = (1 + 0.1 * torch.randn(dim, generator=gen)).to(dtype)
        sd[p + "norm3.bias"] = b(dim)
        sd[p + "ffn.0.weight"] = w(ffn, dim)
        sd[p + "ffn.0.bias"] = b(ffn)
        sd[p + "ffn.2.weight"] = w(dim, ffn)
        sd[p + "ffn.2.bias"] = b(dim)
        sd[p + "modulation"] = (torch.randn(1, 6, dim, generator=gen) / math.sqrt(dim)).to(dtype)
    return sd


def linear_module_names(num_layers: int = TINY["num_layers"], include_ffn: bool = True,
                        include_top: bool = True) -> list[str]:
    """Native paths of the Linear layers of a tiny expert."""
    names = []
    for i in range(num_layers):
        names += [f"blocks.{i}.{n}" for n in ATTENTION_LINEARS]
        if include_ffn:
            names += [f"blocks.{i}.{n}" for n in FFN_LINEARS]
    if include_top:
        names += ["text_embedding.0", "text_embedding.2", "time_embedding.0",
                  "time_embedding.2", "time_projection.1", "head.head"]
    return names


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
