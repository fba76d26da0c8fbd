"""transformers CLIP models (the layout of MPS, PickScore and the aesthetic predictor's encoder):
configurations held as data, and the configuration of a checkpoint inferred from its shapes.
"""

from __future__ import annotations

import torch

from .shapes import count_blocks, text_heads, vision_heads

# laion/CLIP-ViT-H-14-laion2B-s32B-b79K config.json (MIT), the fields CLIPModel uses; MPS and
# PickScore_v1 are fine-tunes of it with the same configuration.
LAION_VIT_H_14_CLIP_CONFIG = {
    "projection_dim": 1024,
    "logit_scale_init_value": 2.6592,
    "text_config": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                    "num_attention_heads": 16, "max_position_embeddings": 77, "vocab_size": 49408,
                    "hidden_act": "gelu", "layer_norm_eps": 1e-5, "bos_token_id": 0, "eos_token_id": 2,
                    "pad_token_id": 1},
    "vision_config": {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
                      "num_attention_heads": 16, "patch_size": 14, "image_size": 224, "num_channels": 3,
                      "hidden_act": "gelu", "layer_norm_eps": 1e-5},
}
# openai/clip-vit-large-patch14 config.json (MIT) vision tower: OpenAI's ViT-L/14, quick GELU.
OPENAI_VIT_L_14_VISION_CONFIG = {
    "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
    "patch_size": 14, "image_size": 224, "num_channels": 3, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
    "projection_dim": 768,
}


def _tower(state_dict, prefix: str) -> dict:
    """The size fields of one tower (``prefix`` = ``text_model.`` or ``vision_model.``) from shapes."""
    layers = count_blocks(state_dict, prefix + "encoder.layers.")
    fc1 = state_dict[prefix + "encoder.layers.0.mlp.fc1.weight"]
    return {"hidden_size": int(fc1.shape[1]), "intermediate_size": int(fc1.shape[0]), "num_hidden_layers": layers}


def infer_vision_config(state_dict, prefix: str = "", base: dict | None = None) -> dict:
    """CLIPVisionConfig kwargs of ``{prefix}vision_model.*`` (patch, image size and heads from shapes)."""
    vision = prefix + "vision_model."
    patch = state_dict[vision + "embeddings.patch_embedding.weight"]
    positions = state_dict[vision + "embeddings.position_embedding.weight"].shape[0] - 1
    grid = int(round(positions ** 0.5))
    if grid * grid != positions:
        raise ValueError(f"{vision}embeddings.position_embedding has {positions + 1} rows: not a square patch grid + 1")
    config = dict(base or LAION_VIT_H_14_CLIP_CONFIG["vision_config"], **_tower(state_dict, vision))
    config.update(num_attention_heads=vision_heads(config["hidden_size"]), patch_size=int(patch.shape[-1]),
                  image_size=grid * int(patch.shape[-1]))
    return config


def infer_clip_config(state_dict, prefix: str = "") -> dict:
    """CLIPConfig kwargs of a transformers CLIPModel state dict (keys ``{prefix}text_model.*``,
    ``{prefix}vision_model.*``, projections); equals the laion ViT-H-14 config for its real files."""
    text = prefix + "text_model."
    tokens = state_dict[text + "embeddings.token_embedding.weight"]
    text_config = dict(LAION_VIT_H_14_CLIP_CONFIG["text_config"], **_tower(state_dict, text))
    text_config.update(num_attention_heads=text_heads(text_config["hidden_size"]), vocab_size=int(tokens.shape[0]),
                       max_position_embeddings=int(state_dict[text + "embeddings.position_embedding.weight"].shape[0]))
    vision_config = infer_vision_config(state_dict, prefix)
    return {"projection_dim": int(state_dict[prefix + "text_projection.weight"].shape[0]),
            "logit_scale_init_value": LAION_VIT_H_14_CLIP_CONFIG["logit_scale_init_value"],
            "text_config": text_config, "vision_config": vision_config}


def build_hf_clip(config: dict):
    from transformers import CLIPConfig, CLIPModel

    return CLIPModel(CLIPConfig(**config))


def build_hf_clip_vision(config: dict):
    """CLIPVisionModelWithProjection (keys ``vision_model.*``, ``visual_projection.weight``)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    return CLIPVisionModelWithProjection(CLIPVisionConfig(**config))


def fill_position_ids(network) -> list[str]:
    """HF CLIP's ``position_ids`` buffers (not in checkpoints since transformers 4.31)."""
    filled = []
    for name, buffer in network.named_buffers():
        if name.endswith("embeddings.position_ids"):
            buffer.copy_(torch.arange(buffer.shape[-1]).expand_as(buffer))
            filled.append(name)
    return filled


def drop_position_ids(state_dict) -> dict:
    """Without the ``position_ids`` buffers older transformers saved (recomputed on load)."""
    return {k: v for k, v in state_dict.items() if not k.endswith("embeddings.position_ids")}


def image_embeds(vision_model, visual_projection, pixels: torch.Tensor) -> torch.Tensor:
    """The projected pooled (CLS, post-layernorm) image embedding, as ``get_image_features`` of
    transformers 4.x returns it (5.x wraps it in an output object)."""
    return visual_projection(vision_model(pixel_values=pixels).pooler_output)


def text_embeds(text_model, text_projection, ids: torch.Tensor) -> torch.Tensor:
    """The projected pooled (EOS) text embedding, as ``get_text_features`` of transformers 4.x."""
    return text_projection(text_model(input_ids=ids).pooler_output)
