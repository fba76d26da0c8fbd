"""Tiny random-weight models with the real architectures and file formats.

Used by the demo, the tests and the benchmarks: Wan2.2 experts in ComfyUI/original
("native") key layout (same keys and shape relations as an A14B expert, tiny dims), a
Wan2.1 VAE in ComfyUI format (diffusers' architecture with a small base width, keys
written back in the original layout), and prompt embeddings.
"""

from __future__ import annotations

import math
import re

import torch

from .wan_names import ATTENTION_LINEARS, FFN_LINEARS

TINY = dict(dim=128, ffn_dim=256, num_layers=2, in_dim=36, out_dim=16, text_dim=4096,
            freq_dim=256, head_dim=128, patch_size=(1, 2, 2))


def tiny_config(**overrides) -> dict:
    config = dict(TINY)
    config.update(overrides)
    config["num_heads"] = config["dim"] // config["head_dim"]
    return config


def tiny_wan_state_dict(seed: int = 0, dtype=torch.float32, **overrides) -> dict[str, torch.Tensor]:
    """Native state dict of a Wan expert with tiny dims (random weights, fixed seed)."""
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


# ---- tiny Wan2.1 VAE in ComfyUI/original layout ------------------------------------------
# diffusers only converts original -> diffusers; this is the inverse for the layout that
# conversion handles (4 levels, 2 res blocks), used only to write tiny test files.
_RES = (("norm1.gamma", "residual.0.gamma"), ("conv1.", "residual.2."), ("norm2.gamma", "residual.3.gamma"),
        ("conv2.", "residual.6."), ("conv_shortcut.", "shortcut."))


def _res_rename(rest: str) -> str:
    for new, old in _RES:
        if rest.startswith(new):
            return old + rest[len(new):]
    return rest


def _vae_key_to_native(key: str) -> str:
    if key.startswith("quant_conv."):
        return "conv1." + key[len("quant_conv."):]
    if key.startswith("post_quant_conv."):
        return "conv2." + key[len("post_quant_conv."):]
    part, rest = key.split(".", 1)
    m = re.match(r"mid_block\.resnets\.(\d)\.(.+)$", rest)
    if m:
        return f"{part}.middle.{0 if m.group(1) == '0' else 2}.{_res_rename(m.group(2))}"
    m = re.match(r"mid_block\.attentions\.0\.(.+)$", rest)
    if m:
        return f"{part}.middle.1.{m.group(1)}"
    for new, old in (("norm_out.", "head.0."), ("conv_out.", "head.2."), ("conv_in.", "conv1.")):
        if rest.startswith(new):
            return f"{part}.{old}{rest[len(new):]}"
    m = re.match(r"down_blocks\.(\d+)\.(.+)$", rest)
    if m:
        return f"{part}.downsamples.{m.group(1)}.{_res_rename(m.group(2))}"
    m = re.match(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)$", rest)
    if m:
        return f"{part}.upsamples.{4 * int(m.group(1)) + int(m.group(2))}.{_res_rename(m.group(3))}"
    m = re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.(.+)$", rest)
    if m:
        return f"{part}.upsamples.{4 * int(m.group(1)) + 3}.{m.group(2)}"
    raise KeyError(f"no native name for VAE key {key}")


def tiny_vae_state_dict(seed: int = 0, base_dim: int = 8) -> dict[str, torch.Tensor]:
    """Native (ComfyUI-format) state dict of a Wan2.1 VAE with base width ``base_dim``."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    model = AutoencoderKLWan(base_dim=base_dim, z_dim=16)
    return {_vae_key_to_native(k): v.clone() for k, v in model.state_dict().items()}


def random_prompt_embeddings(prompts: list[str], dim: int = 4096, seed: int = 0,
                             length: int = 12) -> dict[str, torch.Tensor]:
    """{prompt: [L, dim]} random stand-ins for umT5 embeddings (distinct per prompt)."""
    out = {}
    for i, prompt in enumerate(prompts):
        gen = torch.Generator().manual_seed(seed * 7919 + i)
        n = 1 if prompt == "" else length
        out[prompt] = torch.randn(n, dim, generator=gen) * 0.1
    return out
