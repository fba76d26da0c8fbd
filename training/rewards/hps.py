"""HPS v2 / v2.1: open_clip CLIP built from a config inferred from the checkpoint's shapes.

Score = cosine of the L2-normalised image and text features (no logit scale), as
``hpsv2.img_score.score``. The real files are ViT-H-14; tiny test configs load the same way.
"""

from __future__ import annotations

import torch

from .base import RewardModel
from .loading import build_uninitialised, load_strict
from .preprocess import normalize, resize_long_side_and_pad, rgb, squash
from .shapes import count_blocks, text_heads, vision_head_width
from .tokenizers import hps_tokenize

# Keys that make a state dict an open_clip CLIP (HPS layout).
HPS_MARKER_KEYS = ("visual.conv1.weight", "token_embedding.weight", "text_projection")

# The config hpsv2 builds (open_clip model_configs/ViT-H-14.json), held as data.
VIT_H_14_CONFIG = {
    "embed_dim": 1024,
    "vision_cfg": {"image_size": 224, "layers": 32, "width": 1280, "head_width": 80, "patch_size": 14},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16, "layers": 24},
}


def infer_hps_config(state_dict) -> dict:
    """open_clip model config (``embed_dim``, ``vision_cfg``, ``text_cfg``) from tensor shapes."""
    conv = state_dict["visual.conv1.weight"]
    width, patch = conv.shape[0], conv.shape[-1]
    tokens = state_dict["visual.positional_embedding"].shape[0] - 1
    grid = int(round(tokens ** 0.5))
    if grid * grid != tokens:
        raise ValueError(f"visual.positional_embedding has {tokens + 1} rows: not a square patch grid + 1")
    text_width = state_dict["token_embedding.weight"].shape[1]
    vision_mlp = state_dict["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / width
    text_mlp = state_dict["transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / text_width
    return {
        "embed_dim": int(state_dict["text_projection"].shape[1]),
        "vision_cfg": {
            "image_size": grid * patch, "layers": count_blocks(state_dict, "visual.transformer.resblocks."),
            "width": int(width), "head_width": vision_head_width(int(width)), "patch_size": int(patch),
            "mlp_ratio": vision_mlp,
        },
        "text_cfg": {
            "context_length": int(state_dict["positional_embedding"].shape[0]),
            "vocab_size": int(state_dict["token_embedding.weight"].shape[0]),
            "width": int(text_width), "heads": text_heads(int(text_width)),
            "layers": count_blocks(state_dict, "transformer.resblocks."), "mlp_ratio": text_mlp,
        },
    }


def build_open_clip_model(config: dict):
    """An open_clip CLIP exactly as hpsv2 builds it (GELU, no quick-gelu, fp32 LayerNorm cast back)."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    return CLIP(
        embed_dim=config["embed_dim"],
        vision_cfg=CLIPVisionCfg(**config["vision_cfg"]),
        text_cfg=CLIPTextCfg(**config["text_cfg"]),
        quick_gelu=False, cast_dtype=None, output_dict=True,
    )


class HPSRewardModel(RewardModel):
    name = "hps_v2.1"

    def __init__(self, clip, config: dict, preprocess: str = "reference"):
        super().__init__(preprocess)
        self.clip = clip.eval().requires_grad_(False)
        self.config = config
        self.image_size = int(config["vision_cfg"]["image_size"])
        self.context_length = int(config["text_cfg"]["context_length"])

    def _prompt_cache_key(self) -> tuple:
        return (self.context_length,)

    def _prompt_features(self, prompts):
        tokens = hps_tokenize(prompts, self.context_length).to(self.device)
        return (self.clip.encode_text(tokens, normalize=True),)

    def preprocess_frames(self, frames: torch.Tensor, mode: str) -> torch.Tensor:
        resize = resize_long_side_and_pad if mode == "reference" else squash
        return normalize(resize(rgb(frames), self.image_size))

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_image(pixels.to(self.dtype), normalize=True)

    def _score_pixels(self, frames, prompt_features, mode):
        (text,) = prompt_features
        image = self.image_features(self.preprocess_frames(frames, mode))
        return (image * text.to(image.dtype)).sum(-1)


def _fill_causal_mask(clip) -> list[str]:
    """open_clip's text attention mask (not in checkpoints): -inf above the diagonal, 0 elsewhere."""
    n = clip.attn_mask.shape[0]
    clip.attn_mask.copy_(torch.full((n, n), float("-inf")).triu_(1))
    return ["attn_mask"]


def build_hps(state_dict, preprocess: str = "reference") -> HPSRewardModel:
    """Build the model for ``state_dict`` (open_clip keys) and load it strictly."""
    config = infer_hps_config(state_dict)
    clip = build_uninitialised(lambda: build_open_clip_model(config), _fill_causal_mask)
    load_strict(clip, state_dict, "HPS (open_clip CLIP)")
    return HPSRewardModel(clip, config, preprocess)
