"""Wan transformer module names: ComfyUI/original ("native") <-> diffusers.

Native names are those of the original Wan code, ComfyUI's ``WanModel`` and
VideoX-Fun (``blocks.0.self_attn.q``); diffusers' ``WanTransformer3DModel`` uses
``blocks.0.attn1.to_q``. diffusers only converts whole checkpoints one way, so the
name table for single module paths (LoRA keys, trainer saves) lives here.
"""

from __future__ import annotations

import re

# (native, diffusers) suffixes inside ``blocks.N.``. Order matters for diffusers ->
# native lookups only where one name is a prefix of another; matching is exact.
BLOCK_NAMES: tuple[tuple[str, str], ...] = (
    ("self_attn.q", "attn1.to_q"),
    ("self_attn.k", "attn1.to_k"),
    ("self_attn.v", "attn1.to_v"),
    ("self_attn.o", "attn1.to_out.0"),
    ("self_attn.norm_q", "attn1.norm_q"),
    ("self_attn.norm_k", "attn1.norm_k"),
    ("cross_attn.q", "attn2.to_q"),
    ("cross_attn.k", "attn2.to_k"),
    ("cross_attn.v", "attn2.to_v"),
    ("cross_attn.o", "attn2.to_out.0"),
    ("cross_attn.norm_q", "attn2.norm_q"),
    ("cross_attn.norm_k", "attn2.norm_k"),
    ("cross_attn.k_img", "attn2.add_k_proj"),
    ("cross_attn.v_img", "attn2.add_v_proj"),
    ("cross_attn.norm_k_img", "attn2.norm_added_k"),
    ("ffn.0", "ffn.net.0.proj"),
    ("ffn.2", "ffn.net.2"),
    # diffusers swaps the names of the two block norms; only native norm3
    # (the cross-attention norm) has weights.
    ("norm3", "norm2"),
    ("norm2", "norm3"),
    ("modulation", "scale_shift_table"),
)

# Module paths outside the blocks.
TOP_NAMES: tuple[tuple[str, str], ...] = (
    ("patch_embedding", "patch_embedding"),
    ("text_embedding.0", "condition_embedder.text_embedder.linear_1"),
    ("text_embedding.2", "condition_embedder.text_embedder.linear_2"),
    ("time_embedding.0", "condition_embedder.time_embedder.linear_1"),
    ("time_embedding.2", "condition_embedder.time_embedder.linear_2"),
    ("time_projection.1", "condition_embedder.time_proj"),
    ("head.head", "proj_out"),
    ("head.modulation", "scale_shift_table"),
    ("img_emb.proj.0", "condition_embedder.image_embedder.norm1"),
    ("img_emb.proj.1", "condition_embedder.image_embedder.ff.net.0.proj"),
    ("img_emb.proj.3", "condition_embedder.image_embedder.ff.net.2"),
    ("img_emb.proj.4", "condition_embedder.image_embedder.norm2"),
)

_BLOCK = {".": re.compile(r"^blocks\.(\d+)\.(.+)$"), "_": re.compile(r"^blocks_(\d+)_(.+)$")}
_N2D_BLOCK = dict(BLOCK_NAMES)
_D2N_BLOCK = {d: n for n, d in BLOCK_NAMES}
_N2D_TOP = dict(TOP_NAMES)
_D2N_TOP = {d: n for n, d in TOP_NAMES}


def translate(path: str, block_table: dict[str, str], top_table: dict[str, str], sep: str = ".") -> str | None:
    """Map a module path through a name table; None if unknown.

    ``path`` is joined by ``sep`` ("." or kohya's "_"); ``block_table`` maps the part after
    ``blocks<sep>N<sep>`` and ``top_table`` whole paths outside the blocks, both with keys
    joined by ``sep``. The result is dotted: ``blocks.N.<block_table value>``.
    """
    match = _BLOCK[sep].match(path)
    if match:
        inner = block_table.get(match.group(2))
        return None if inner is None else f"blocks.{match.group(1)}.{inner}"
    return top_table.get(path)


def native_to_diffusers(path: str) -> str | None:
    """``blocks.3.self_attn.q`` -> ``blocks.3.attn1.to_q``; None if unknown."""
    return translate(path, _N2D_BLOCK, _N2D_TOP)


def diffusers_to_native(path: str) -> str | None:
    """``blocks.3.attn1.to_q`` -> ``blocks.3.self_attn.q``; None if unknown."""
    return translate(path, _D2N_BLOCK, _D2N_TOP)


# Linear layers of a Wan2.2 A14B expert (native names, inside each block), the
# ones a reward LoRA targets. The seed trains all Linears except the FFN.
ATTENTION_LINEARS: tuple[str, ...] = (
    "self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
    "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o",
)
FFN_LINEARS: tuple[str, ...] = ("ffn.0", "ffn.2")
# Keys only Wan2.1 image-to-video checkpoints have (CLIP image branch).
WAN21_I2V_MARKERS: tuple[str, ...] = ("k_img", "v_img", "norm_k_img", "img_emb")
