"""MPS (Kwai-Kolors, CVPR 2024): HF CLIP (laion ViT-H-14 config, held as data) + the cross model.

Variants (see docs/reward-models.md):
- "official" (default): the official single-image scorer, mask threshold 0.3,
  score = logit_scale.exp() * cos (about 100 * cos).
- "videox_fun": the reference trainer's (VideoX-Fun) reward, threshold 0.01, plain cosine,
  with the mask normalised per sample (the reference's batch-global max made scores depend
  on the other frames in the batch; we never do that).
"""

from __future__ import annotations

import torch

from .base import RewardModel
from .loading import build_uninitialised, load_strict
from .cross_model import CrossModel
from .hf_clip import (
    LAION_VIT_H_14_CLIP_CONFIG,  # noqa: F401 (re-exported)
    build_hf_clip,
    fill_position_ids,
    infer_clip_config,
)
from .preprocess import normalize, resize_short_side_and_crop, rgb, squash
from .shapes import count_blocks
from .tokenizers import mps_tokenize

CONDITION = ("light, color, clarity, tone, style, ambiance, artistry, shape, face, hair, hands, limbs, "
             "structure, instance, texture, quantity, attributes, position, number, location, word, things.")
MPS_VARIANTS = {"official": {"threshold": 0.3, "logit_scale": True},
                "videox_fun": {"threshold": 0.01, "logit_scale": False}}
MPS_MARKER_KEYS = ("model.vision_model.embeddings.patch_embedding.weight", "cross_model.layers.0.0.fn.to_q.weight")

CROSS_MODEL_CONFIG = {"dim": 1024, "layers": 4, "dim_head": 64, "heads": 16, "ff_mult": 4}


def infer_mps_config(state_dict) -> tuple[dict, dict]:
    """(HF CLIPConfig kwargs, cross-model kwargs) from tensor shapes; equals the laion config for the real file."""
    clip = infer_clip_config(state_dict, prefix="model.")
    to_q = state_dict["cross_model.layers.0.0.fn.to_q.weight"]
    dim_head = int(state_dict["cross_model.layers.0.0.fn.to_kv.weight"].shape[0]) // 2
    cross = {"dim": int(to_q.shape[1]), "layers": count_blocks(state_dict, "cross_model.layers."),
             "dim_head": dim_head, "heads": int(to_q.shape[0]) // dim_head,
             "ff_mult": int(state_dict["cross_model.layers.0.0.fn.ff.0.weight"].shape[0]) // (2 * int(to_q.shape[1]))}
    return clip, cross


class MPSNetwork(torch.nn.Module):
    """Holds ``model`` (HF CLIPModel) and ``cross_model``: the key layout of the converted files."""
    def __init__(self, clip_config: dict, cross_config: dict):
        super().__init__()
        self.model = build_hf_clip(clip_config)
        self.cross_model = CrossModel(**cross_config)

    def text_features(self, ids):
        """(per-token features [N, 77, D], EOS features [N, D]), unnormalised, as MPS's XCLIPModel."""
        out = self.model.text_model(input_ids=ids)
        return self.model.text_projection(out.last_hidden_state), self.model.text_projection(out.pooler_output)

    def image_tokens(self, pixels):
        """All tokens before post_layernorm, projected: [B, 257, D]."""
        hidden = self.model.vision_model(pixel_values=pixels).last_hidden_state
        return self.model.visual_projection(hidden)


def condition_mask(text_tokens, condition_tokens, threshold: float) -> torch.Tensor:
    """Additive mask [N, 1, 77]: text tokens similar enough to the condition words (per sample max)."""
    sim = torch.einsum("bid,bjd->bji", text_tokens, condition_tokens).amax(dim=1, keepdim=True)
    sim = sim / sim.amax(dim=(1, 2), keepdim=True)
    zero = torch.zeros((), dtype=sim.dtype, device=sim.device)
    return torch.where(sim > threshold, zero, torch.full_like(zero, float("-inf")))


class MPSRewardModel(RewardModel):
    name = "mps"

    def __init__(self, network: MPSNetwork, clip_config: dict, cross_config: dict,
                 variant: str = "official", preprocess: str = "reference"):
        super().__init__(preprocess)
        if variant not in MPS_VARIANTS:
            raise ValueError(f"MPS variant must be one of {tuple(MPS_VARIANTS)}, got {variant!r}")
        self.network = network.eval().requires_grad_(False)
        self.variant = variant
        self.threshold = MPS_VARIANTS[variant]["threshold"]
        self.use_logit_scale = MPS_VARIANTS[variant]["logit_scale"]
        self.clip_config, self.cross_config = clip_config, cross_config
        self.image_size = int(clip_config["vision_config"]["image_size"])
        self.context_length = int(clip_config["text_config"]["max_position_embeddings"])

    def _prompt_cache_key(self) -> tuple:
        return (self.context_length, float(self.threshold))

    def _prompt_features(self, prompts):
        ids = mps_tokenize(prompts, self.context_length).to(self.device)
        cond_ids = mps_tokenize([CONDITION], self.context_length).to(self.device)
        tokens, eos = self.network.text_features(ids)
        cond_tokens, _ = self.network.text_features(cond_ids)
        mask = condition_mask(tokens, cond_tokens.expand(len(prompts), -1, -1), self.threshold)
        return tokens, torch.nn.functional.normalize(eos, dim=-1), mask

    def preprocess_frames(self, frames: torch.Tensor, mode: str) -> torch.Tensor:
        resize = resize_short_side_and_crop if mode == "reference" else squash
        pixels = normalize(resize(rgb(frames), self.image_size))
        # The reference rounds pixels to fp16 (``px.half()``) whatever the model dtype.
        return pixels.half().to(self.dtype)

    def _score_pixels(self, frames, prompt_features, mode):
        tokens, eos, mask = prompt_features
        image = self.network.image_tokens(self.preprocess_frames(frames, mode))
        fused = self.network.cross_model(image, tokens.to(image.dtype), mask.to(image.dtype))[:, 0]
        cosine = (torch.nn.functional.normalize(fused, dim=-1) * eos.to(fused.dtype)).sum(-1)
        if self.use_logit_scale:
            return self.network.model.logit_scale.exp() * cosine
        return cosine


def build_mps(state_dict, variant: str | None = None, preprocess: str = "reference") -> MPSRewardModel:
    """Build the model for ``state_dict`` (keys ``model.*`` and ``cross_model.*``) and load it strictly."""
    clip_config, cross_config = infer_mps_config(state_dict)
    network = build_uninitialised(lambda: MPSNetwork(clip_config, cross_config), fill_position_ids)
    load_strict(network, state_dict, "MPS (HF CLIPModel + cross model)")
    return MPSRewardModel(network, clip_config, cross_config, variant or "official", preprocess)
