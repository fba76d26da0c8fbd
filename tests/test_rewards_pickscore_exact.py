"""PickScore: our scorer equals the PickScore README's scoring (transformers CLIPModel, laion's PIL
processor, logit_scale x cosine) on the same weights, fp32 on CPU; and the real configuration."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from tests.helpers.reference_pickscore import reference_pixels, reference_scores
from safetensors.torch import load_file

from training.rewards import load_reward_model
from training.rewards.hf_clip import (
    LAION_VIT_H_14_CLIP_CONFIG,
    build_hf_clip,
    infer_clip_config,
)
from training.rewards.tiny import TINY_PICKSCORE_CONFIG, write_tiny_pickscore_checkpoint

PROMPTS = ["A red fox running through fresh snow at sunrise", "two hands holding a glowing lantern, 35mm photo"]


def _image(height: int, width: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width]
    base = np.stack([xs / width, ys / height, (xs + ys) / (width + height)], -1) * 200
    return np.clip(base + rng.normal(0, 25, (height, width, 3)), 0, 255).astype(np.uint8)


def _tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array).permute(2, 0, 1).float().div(255).unsqueeze(0)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    path = tmp_path_factory.mktemp("pickscore") / "PickScore_v1.safetensors"
    write_tiny_pickscore_checkpoint(path, seed=7)
    reference = build_hf_clip(TINY_PICKSCORE_CONFIG).eval()  # the README's AutoModel: a CLIPModel
    result = reference.load_state_dict(load_file(str(path)), strict=False)
    assert not result.unexpected_keys and all(k.endswith("position_ids") for k in result.missing_keys)
    return reference, load_reward_model(path)


@pytest.mark.parametrize("size", [(224, 224), (224, 303), (303, 224)], ids=str)
def test_scores_equal_reference_end_to_end(models, size):
    """Frames whose short side is 224: the processor only crops (PIL's resize is a no-op), so the
    whole pipeline is compared; 303 checks the crop offset (floor of 79 / 2)."""
    reference, ours = models
    arrays = [_image(*size, seed=i) for i in range(3)]
    for prompt in PROMPTS:
        expected = reference_scores(reference, prompt, images=[Image.fromarray(a) for a in arrays])
        got = ours.score(torch.cat([_tensor(a) for a in arrays]), prompt)
        assert torch.allclose(got, expected, atol=1e-4, rtol=0), (prompt, got, expected)
    assert float(expected.std()) > 1e-3


def test_resized_frames_match_reference_pixels_and_scores(models):
    """480x832: our tensor resize is within 1/255 of the PIL one on average; from the same pixels the
    scores are equal within 1e-4."""
    reference, ours = models
    arrays = [_image(480, 832, seed=10 + i) for i in range(2)]
    frames = torch.cat([_tensor(a) for a in arrays])
    theirs = reference_pixels([Image.fromarray(a) for a in arrays])
    pixels = ours.preprocess_frames(frames, "reference")
    assert pixels.shape == theirs.shape == (2, 3, 224, 224)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    assert float(((pixels - theirs) * std).abs().mean()) < 1 / 255
    expected = reference_scores(reference, PROMPTS[0], pixels=pixels)
    with torch.no_grad():
        (text,) = ours._prompt_features([PROMPTS[0]])
        got = ours.clip.logit_scale.exp() * (ours.image_features(pixels) * text).sum(-1)
    assert torch.allclose(got, expected, atol=1e-4, rtol=0)


def test_score_is_differentiable(models):
    _, ours = models
    frames = torch.rand(2, 3, 64, 96, requires_grad=True)
    ours.score(frames, PROMPTS[0]).sum().backward()
    assert frames.grad is not None and float(frames.grad.abs().sum()) > 0


def test_real_configuration_from_shapes():
    """PickScore_v1's CLIPModel (laion ViT-H/14) built on the meta device: the configuration inferred from
    its shapes is the laion one, with open_clip ViT-H-14's parameter count."""
    with torch.device("meta"):
        state_dict = build_hf_clip(LAION_VIT_H_14_CLIP_CONFIG).state_dict()
    params = {k: v for k, v in state_dict.items() if not k.endswith("position_ids")}
    assert sum(v.numel() for v in params.values()) == 986_109_441
    config = infer_clip_config(params)
    for tower in ("text_config", "vision_config"):
        assert config[tower] == LAION_VIT_H_14_CLIP_CONFIG[tower], tower
    assert config["projection_dim"] == 1024
