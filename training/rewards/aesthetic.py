"""The LAION aesthetic predictor v2 (christophschuhmann/improved-aesthetic-predictor): the
L2-normalised CLIP ViT-L/14 image embedding into a 5-layer linear MLP; a score of about 1 to 10.

Its released file (``sac+logos+ava1-l14-linearMSE.pth``) holds only the MLP
(``layers.{0,2,4,6,7}``: 768 -> 1024 -> 128 -> 64 -> 16 -> 1, dropouts between, no activation).
The image encoder is OpenAI's CLIP ViT-L/14 (quick GELU), here in the transformers layout
(``openai/clip-vit-large-patch14``). ``join_aesthetic`` (command: ``python -m tools.convert_aesthetic``) joins the two
into one file (``vision_model.*``, ``visual_projection.weight``, ``mlp.layers.*``), the one this
loader reads. The prompt is not used. Preprocessing "reference" is OpenAI CLIP's: short side to
224 (bicubic), torchvision's centre crop; "squash" is VideoX-Fun's 224x224 stretch.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from .base import RewardModel
from ..safe_io import UserFileError
from .loading import build_uninitialised, describe_keys, load_strict, strip_prefixes
from .hf_clip import (
    OPENAI_VIT_L_14_VISION_CONFIG,
    build_hf_clip_vision,
    drop_position_ids,
    fill_position_ids,
    image_embeds,
    infer_vision_config,
)
from .preprocess import normalize, resize_short_side_and_crop, rgb, squash

MLP_PREFIX = "mlp."
AESTHETIC_MARKER_KEYS = ("vision_model.embeddings.patch_embedding.weight", "visual_projection.weight",
                         MLP_PREFIX + "layers.0.weight")
_MLP_KEY = re.compile(r"layers\.(\d+)\.(weight|bias)$")


def is_mlp_only(state_dict) -> bool:
    """The released predictor file alone: only ``layers.N.weight/bias`` of a linear stack."""
    return bool(state_dict) and all(_MLP_KEY.match(k) for k in state_dict) and "layers.0.weight" in state_dict


class AestheticMLP(nn.Module):
    """The predictor's ``nn.Sequential`` with the released file's indices (dropouts as identities:
    scoring runs in eval mode, where dropout is the identity)."""
    def __init__(self, sizes: dict[int, tuple[int, int]]):
        super().__init__()
        last = max(sizes)
        self.layers = nn.Sequential(*[nn.Linear(sizes[i][1], sizes[i][0]) if i in sizes else nn.Identity()
                                      for i in range(last + 1)])

    def forward(self, x):
        return self.layers(x)


def mlp_sizes(state_dict, prefix: str = "") -> dict[int, tuple[int, int]]:
    """{layer index: (out, in)} of the MLP's Linear layers, checked to chain."""
    sizes = {}
    for key, value in state_dict.items():
        match = _MLP_KEY.match(key[len(prefix):]) if key.startswith(prefix) else None
        if match and match.group(2) == "weight":
            sizes[int(match.group(1))] = (int(value.shape[0]), int(value.shape[1]))
    order = sorted(sizes)
    for a, b in zip(order, order[1:]):
        if sizes[a][0] != sizes[b][1]:
            raise ValueError(f"{prefix}layers.{a} gives {sizes[a][0]} features but {prefix}layers.{b} takes "
                             f"{sizes[b][1]}")
    if not order or sizes[order[-1]][0] != 1:
        raise ValueError(f"the last MLP layer must give one score, got {sizes.get(order[-1]) if order else None}")
    return sizes


class AestheticRewardModel(RewardModel):
    name = "aesthetic"
    needs_prompt = False

    def __init__(self, vision, mlp: AestheticMLP, config: dict, preprocess: str = "reference"):
        super().__init__(preprocess)
        self.vision = vision.eval().requires_grad_(False)
        self.mlp = mlp.eval().requires_grad_(False)
        self.config = config
        self.image_size = int(config["image_size"])

    def preprocess_frames(self, frames: torch.Tensor, mode: str) -> torch.Tensor:
        if mode == "reference":
            return normalize(resize_short_side_and_crop(rgb(frames), self.image_size, crop_top="round"))
        return normalize(squash(rgb(frames), self.image_size))

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        embeds = image_embeds(self.vision.vision_model, self.vision.visual_projection, pixels.to(self.dtype))
        return F.normalize(embeds, dim=-1)

    def _score_pixels(self, frames, prompt_features, mode):
        return self.mlp(self.image_features(self.preprocess_frames(frames, mode))).squeeze(-1)


def build_aesthetic(state_dict, preprocess: str = "reference") -> AestheticRewardModel:
    """Build the model for a joined file (``vision_model.*``, ``visual_projection.weight``,
    ``mlp.layers.*``) and load both parts strictly."""
    state_dict = drop_position_ids(state_dict)
    mlp_part = {k[len(MLP_PREFIX):]: v for k, v in state_dict.items() if k.startswith(MLP_PREFIX)}
    vision_part = {k: v for k, v in state_dict.items() if not k.startswith(MLP_PREFIX)}
    config = dict(infer_vision_config(vision_part, base=OPENAI_VIT_L_14_VISION_CONFIG),
                  projection_dim=int(vision_part["visual_projection.weight"].shape[0]))
    vision = build_uninitialised(lambda: build_hf_clip_vision(config), fill_position_ids)
    load_strict(vision, vision_part, "aesthetic predictor encoder (CLIP ViT-L/14, transformers layout)")
    mlp = AestheticMLP(mlp_sizes(mlp_part))
    load_strict(mlp, mlp_part, "aesthetic predictor MLP")
    if config["projection_dim"] != mlp.layers[0].in_features:
        raise ValueError(f"the encoder gives {config['projection_dim']}-d embeddings but the MLP takes "
                         f"{mlp.layers[0].in_features}")
    return AestheticRewardModel(vision, mlp, config, preprocess)


def join_aesthetic(mlp: dict[str, torch.Tensor], clip: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The joined state dict (``vision_model.*``, ``visual_projection.weight``, ``mlp.layers.*``);
    UserFileError naming what does not fit."""
    mlp, clip = strip_prefixes(mlp), strip_prefixes(clip)
    if not is_mlp_only(mlp):
        raise UserFileError(f"the predictor file is not the aesthetic MLP (layers.N.weight/bias): found "
                            f"{describe_keys(mlp)}")
    vision = {k: v for k, v in clip.items() if k.startswith("vision_model.") or k == "visual_projection.weight"}
    if "visual_projection.weight" not in vision or "vision_model.embeddings.patch_embedding.weight" not in vision:
        raise UserFileError("the CLIP file has no transformers vision tower with its projection (vision_model.*, "
                            f"visual_projection.weight): found {describe_keys(clip)}")
    try:
        sizes = mlp_sizes(mlp)
    except ValueError as exc:
        raise UserFileError(f"the predictor's layers do not chain: {exc}") from None
    width, first = int(vision["visual_projection.weight"].shape[0]), sizes[min(sizes)][1]
    if width != first:
        raise UserFileError(f"the CLIP file gives {width}-d image embeddings but the MLP takes {first}: the "
                            "predictor v2 needs CLIP ViT-L/14 (768-d)")
    return {**{k: v for k, v in vision.items() if not k.endswith("position_ids")},
            **{MLP_PREFIX + k: v for k, v in mlp.items()}}
