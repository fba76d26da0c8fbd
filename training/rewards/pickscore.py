"""PickScore (Kirstain et al. 2023, ``yuvalkirstain/PickScore_v1``): a transformers CLIPModel
(laion ViT-H/14 configuration) fine-tuned on Pick-a-Pic preferences.

Score = ``logit_scale.exp() * cos(image, text)`` of the projected pooled features (about
100 * cos, typical 18 to 23), as the scoring code in the PickScore repository's README. Its
processor is laion's CLIPProcessor: short side to 224 (bicubic), centre crop 224, CLIP mean/std.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import RewardModel
from .loading import build_uninitialised, load_strict
from .hf_clip import (
    build_hf_clip,
    drop_position_ids,
    fill_position_ids,
    image_embeds,
    infer_clip_config,
    text_embeds,
)
from .preprocess import normalize, resize_short_side_and_crop, rgb, squash
from .tokenizers import laion_tokenize

# A transformers CLIPModel with both towers and their projections.
PICKSCORE_MARKER_KEYS = ("text_model.embeddings.token_embedding.weight",
                         "vision_model.embeddings.patch_embedding.weight",
                         "text_projection.weight", "visual_projection.weight", "logit_scale")


class PickScoreRewardModel(RewardModel):
    name = "pickscore"

    def __init__(self, clip, config: dict, preprocess: str = "reference"):
        super().__init__(preprocess)
        self.clip = clip.eval().requires_grad_(False)
        self.config = config
        self.image_size = int(config["vision_config"]["image_size"])
        self.context_length = int(config["text_config"]["max_position_embeddings"])

    def _prompt_cache_key(self) -> tuple:
        return (self.context_length,)

    def _prompt_features(self, prompts):
        ids = laion_tokenize(prompts, self.context_length).to(self.device)
        return (F.normalize(text_embeds(self.clip.text_model, self.clip.text_projection, ids), dim=-1),)

    def preprocess_frames(self, frames: torch.Tensor, mode: str) -> torch.Tensor:
        resize = resize_short_side_and_crop if mode == "reference" else squash
        return normalize(resize(rgb(frames), self.image_size))

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        embeds = image_embeds(self.clip.vision_model, self.clip.visual_projection, pixels.to(self.dtype))
        return F.normalize(embeds, dim=-1)

    def _score_pixels(self, frames, prompt_features, mode):
        (text,) = prompt_features
        image = self.image_features(self.preprocess_frames(frames, mode))
        return self.clip.logit_scale.exp() * (image * text.to(image.dtype)).sum(-1)


def build_pickscore(state_dict, preprocess: str = "reference") -> PickScoreRewardModel:
    """Build the model for ``state_dict`` (transformers CLIPModel keys) and load it strictly."""
    state_dict = drop_position_ids(state_dict)
    config = infer_clip_config(state_dict)
    clip = build_uninitialised(lambda: build_hf_clip(config), fill_position_ids)
    load_strict(clip, state_dict, "PickScore (transformers CLIPModel)")
    return PickScoreRewardModel(clip, config, preprocess)
