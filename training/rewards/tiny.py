"""Tiny HPS, MPS, PickScore and aesthetic checkpoints: the real architectures and file layouts, random weights.

For tests and the CPU demo. ``load_reward_model`` infers these configs from the
shapes, exactly as it does for the real ViT-H-14 files.
"""

from __future__ import annotations

import os

import torch

from ..safe_io import save_safetensors, torch_save

# open_clip model config (registrable with open_clip / hpsv2 ``add_model_config``).
TINY_HPS_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 128, "head_width": 64, "patch_size": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 2},
}
TINY_MPS_CLIP_CONFIG = {
    "projection_dim": 64,
    "logit_scale_init_value": 2.6592,
    "text_config": {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 1,
                    "max_position_embeddings": 77, "vocab_size": 49408, "hidden_act": "gelu",
                    "layer_norm_eps": 1e-5, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1},
    "vision_config": {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 2,
                      "patch_size": 32, "image_size": 224, "num_channels": 3, "hidden_act": "gelu",
                      "layer_norm_eps": 1e-5},
}
TINY_MPS_CROSS_CONFIG = {"dim": 64, "layers": 2, "dim_head": 32, "heads": 2, "ff_mult": 4}


def tiny_hps_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    from .hps import build_open_clip_model

    torch.manual_seed(seed)
    return {k: v.detach().clone() for k, v in build_open_clip_model(TINY_HPS_CONFIG).state_dict().items()}


def tiny_mps_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    from .mps import MPSNetwork

    torch.manual_seed(seed)
    network = MPSNetwork(TINY_MPS_CLIP_CONFIG, TINY_MPS_CROSS_CONFIG)
    # Norm weights start at 1 and projections small; spread the cross model so the
    # mask and the image matter for the score.
    with torch.no_grad():
        for name, param in network.cross_model.named_parameters():
            if param.ndim == 2:
                param.normal_(0.0, 0.08)
    return {k: v.detach().clone() for k, v in network.state_dict().items()
            if not k.endswith("position_ids")}


def write_tiny_hps_checkpoint(path: str | os.PathLike, seed: int = 0) -> str:
    """``{'state_dict': fp16 tensors}`` as HPS_v2.1_compressed.pt, or fp32 .safetensors."""
    state_dict = tiny_hps_state_dict(seed)
    if str(path).endswith(".safetensors"):
        return str(save_safetensors(state_dict, path))
    return str(torch_save({"state_dict": {k: v.half() for k, v in state_dict.items()}}, path))


def write_tiny_mps_checkpoint(path: str | os.PathLike, seed: int = 0) -> str:
    """A converted MPS state dict (``model.*``, ``cross_model.*``): .safetensors or a weights-only .pth."""
    state_dict = tiny_mps_state_dict(seed)
    if str(path).endswith(".safetensors"):
        return str(save_safetensors(state_dict, path))
    return str(torch_save(state_dict, path))


# PickScore: a transformers CLIPModel (the tiny MPS CLIP configuration, without the cross model).
TINY_PICKSCORE_CONFIG = TINY_MPS_CLIP_CONFIG
# Aesthetic predictor: an OpenAI-style CLIP vision tower (quick GELU) and the MLP's layer layout.
TINY_AESTHETIC_VISION_CONFIG = {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 2,
                                "num_attention_heads": 2, "patch_size": 32, "image_size": 224, "num_channels": 3,
                                "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "projection_dim": 64}
TINY_AESTHETIC_MLP_SIZES = {0: (128, 64), 2: (32, 128), 4: (16, 32), 6: (8, 16), 7: (1, 8)}


def tiny_pickscore_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    from .hf_clip import build_hf_clip

    torch.manual_seed(seed)
    return {k: v.detach().clone() for k, v in build_hf_clip(TINY_PICKSCORE_CONFIG).state_dict().items()
            if not k.endswith("position_ids")}


def tiny_aesthetic_mlp_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """The released predictor file's layout (``layers.N.weight/bias``) at a tiny size."""
    from .aesthetic import AestheticMLP

    torch.manual_seed(seed)
    return {k: v.detach().clone() for k, v in AestheticMLP(TINY_AESTHETIC_MLP_SIZES).state_dict().items()}


def tiny_aesthetic_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """The joined file (vision tower, projection, ``mlp.layers.*``) at a tiny size."""
    from .aesthetic import MLP_PREFIX
    from .hf_clip import build_hf_clip_vision

    torch.manual_seed(seed)
    vision = build_hf_clip_vision(TINY_AESTHETIC_VISION_CONFIG).state_dict()
    mlp = tiny_aesthetic_mlp_state_dict(seed + 1)
    return {**{k: v.detach().clone() for k, v in vision.items() if not k.endswith("position_ids")},
            **{MLP_PREFIX + k: v for k, v in mlp.items()}}


def write_tiny_pickscore_checkpoint(path: str | os.PathLike, seed: int = 0) -> str:
    return str(save_safetensors(tiny_pickscore_state_dict(seed), path))


def write_tiny_aesthetic_checkpoint(path: str | os.PathLike, seed: int = 0) -> str:
    return str(save_safetensors(tiny_aesthetic_state_dict(seed), path))
