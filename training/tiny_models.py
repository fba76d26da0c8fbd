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


def wan_expert_shapes(**overrides) -> dict[str, tuple[int, ...]]:
    """{native key: shape} of a Wan expert (tiny dims by default; ``dim=5120, ffn_dim=13824,
    num_layers=40`` give an A14B expert)."""
    c = tiny_config(**overrides)
    dim, ffn = c["dim"], c["ffn_dim"]
    pt, ph, pw = c["patch_size"]
    shapes: dict[str, tuple[int, ...]] = {
        "patch_embedding.weight": (dim, c["in_dim"], pt, ph, pw), "patch_embedding.bias": (dim,),
        "text_embedding.0.weight": (dim, c["text_dim"]), "text_embedding.0.bias": (dim,),
        "text_embedding.2.weight": (dim, dim), "text_embedding.2.bias": (dim,),
        "time_embedding.0.weight": (dim, c["freq_dim"]), "time_embedding.0.bias": (dim,),
        "time_embedding.2.weight": (dim, dim), "time_embedding.2.bias": (dim,),
        "time_projection.1.weight": (6 * dim, dim), "time_projection.1.bias": (6 * dim,),
        "head.head.weight": (c["out_dim"] * pt * ph * pw, dim), "head.head.bias": (c["out_dim"] * pt * ph * pw,),
        "head.modulation": (1, 2, dim),
    }
    for i in range(c["num_layers"]):
        p = f"blocks.{i}."
        for name in ATTENTION_LINEARS:
            shapes[p + name + ".weight"] = (dim, dim)
            shapes[p + name + ".bias"] = (dim,)
        for attn in ("self_attn", "cross_attn"):
            shapes[p + attn + ".norm_q.weight"] = (dim,)
            shapes[p + attn + ".norm_k.weight"] = (dim,)
        shapes[p + "norm3.weight"] = (dim,)
        shapes[p + "norm3.bias"] = (dim,)
        shapes[p + "ffn.0.weight"] = (ffn, dim)
        shapes[p + "ffn.0.bias"] = (ffn,)
        shapes[p + "ffn.2.weight"] = (dim, ffn)
        shapes[p + "ffn.2.bias"] = (dim,)
        shapes[p + "modulation"] = (1, 6, dim)
    return shapes


def tiny_wan_state_dict(seed: int = 0, dtype=torch.float32, **overrides) -> dict[str, torch.Tensor]:
    """Native state dict of a Wan expert with tiny dims (random weights, fixed seed)."""
    gen = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for key, shape in wan_expert_shapes(**overrides).items():
        if key.endswith(("norm_q.weight", "norm_k.weight", "norm3.weight")):
            value = 1 + 0.1 * torch.randn(*shape, generator=gen)
        elif key.endswith("modulation"):
            value = torch.randn(*shape, generator=gen) / math.sqrt(shape[-1])
        elif len(shape) == 1:
            value = torch.randn(*shape, generator=gen) * 0.02
        else:
            value = torch.randn(*shape, generator=gen) / math.sqrt(shape[1])
        sd[key] = value.to(dtype)
    return sd


def write_sparse_safetensors(path, shapes: dict[str, tuple[int, ...]], dtype: str = "BF16",
                             metadata: dict[str, str] | None = None) -> None:
    """A valid safetensors file of the given shapes whose data is a hole (a sparse file: the size of
    the real weights on disk costs nothing). For checks that read headers only, e.g. real-size
    A14B experts in the preflight and memory-estimate tests."""
    import json

    itemsize = {"BF16": 2, "F16": 2, "F32": 4, "F8_E4M3": 1}[dtype]
    header: dict = {"__metadata__": dict(metadata or {})}
    offset = 0
    for key, shape in shapes.items():
        size = math.prod(shape) * itemsize
        header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as handle:
        handle.write(len(raw).to_bytes(8, "little") + raw)
        handle.truncate(8 + len(raw) + offset)


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
