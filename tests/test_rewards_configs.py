"""The configs inferred from checkpoint shapes equal the real ViT-H-14 ones (built on the meta device)."""

from __future__ import annotations

import torch

from training.rewards.hps import VIT_H_14_CONFIG, build_open_clip_model, infer_hps_config
from training.rewards.mps import CROSS_MODEL_CONFIG, LAION_VIT_H_14_CLIP_CONFIG, MPSNetwork, infer_mps_config


def test_hps_vit_h_14_config_from_shapes():
    with torch.device("meta"):
        state_dict = build_open_clip_model(VIT_H_14_CONFIG).state_dict()
    assert len(state_dict) == 686  # as hpsv2's checkpoint
    assert sum(v.numel() for v in state_dict.values()) == 986_109_441
    config = infer_hps_config(state_dict)
    assert config["embed_dim"] == 1024
    assert {k: config["vision_cfg"][k] for k in VIT_H_14_CONFIG["vision_cfg"]} == VIT_H_14_CONFIG["vision_cfg"]
    assert {k: config["text_cfg"][k] for k in VIT_H_14_CONFIG["text_cfg"]} == VIT_H_14_CONFIG["text_cfg"]
    assert config["vision_cfg"]["mlp_ratio"] == 4 and config["text_cfg"]["mlp_ratio"] == 4


def test_mps_laion_config_from_shapes():
    with torch.device("meta"):
        network = MPSNetwork(LAION_VIT_H_14_CLIP_CONFIG, CROSS_MODEL_CONFIG)
    state_dict = network.state_dict()
    cross = sum(v.numel() for k, v in network.named_parameters() if k.startswith("cross_model."))
    assert cross == 118_497_280  # the released cross model's trainable size
    clip_config, cross_config = infer_mps_config(state_dict)
    assert cross_config == CROSS_MODEL_CONFIG
    for tower in ("text_config", "vision_config"):
        assert clip_config[tower] == LAION_VIT_H_14_CLIP_CONFIG[tower], tower
    assert clip_config["projection_dim"] == 1024
