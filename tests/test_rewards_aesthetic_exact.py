"""LAION aesthetic predictor: our scorer equals improved-aesthetic-predictor's simple_inference.py steps
(OpenAI's clip code and preprocess, numpy normalisation, the MLP) on the same weights, fp32 on CPU;
the joining converter; the real configuration (shapes, and one real-size forward marked slow)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from tests.helpers.reference_aesthetic import (
    ReferenceMLP,
    import_clip,
    openai_vision_to_transformers,
    reference_scores,
)

from training.rewards import load_reward_model
from training.rewards.aesthetic import AestheticMLP
from training.rewards.aesthetic import join_aesthetic
from tools.convert_aesthetic import main as convert_main
from training.rewards.hf_clip import (
    OPENAI_VIT_L_14_VISION_CONFIG,
    build_hf_clip_vision,
    infer_vision_config,
)
from training.safe_io import UserFileError, save_safetensors, torch_save

TINY_OPENAI = dict(embed_dim=64, image_resolution=224, vision_layers=2, vision_width=128, vision_patch_size=32,
                   context_length=77, vocab_size=49408, transformer_width=64, transformer_heads=1,
                   transformer_layers=1)
REAL_OPENAI = dict(embed_dim=768, image_resolution=224, vision_layers=24, vision_width=1024, vision_patch_size=14,
                   context_length=77, vocab_size=49408, transformer_width=768, transformer_heads=12,
                   transformer_layers=12)  # ViT-L/14 as clip.model.build_model reads it from the OpenAI file


def _image(height: int, width: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width]
    base = np.stack([xs / width, ys / height, (xs + ys) / (width + height)], -1) * 200
    return np.clip(base + rng.normal(0, 25, (height, width, 3)), 0, 255).astype(np.uint8)


def _tensor(arrays) -> torch.Tensor:
    return torch.cat([torch.from_numpy(a).permute(2, 0, 1).float().div(255).unsqueeze(0) for a in arrays])


def _setup(folder, openai_config: dict, widths, seed: int):
    """(reference CLIP, its preprocess, reference MLP, our model) on the same random weights; the files
    go through the converter as a user's would (the MLP as a weights-only .pth, the encoder as
    transformers safetensors)."""
    clip = import_clip()
    torch.manual_seed(seed)
    reference = clip.model.CLIP(**openai_config).float().eval()
    mlp = ReferenceMLP(openai_config["embed_dim"], widths).eval()
    with torch.no_grad():
        for layer in mlp.layers:
            if isinstance(layer, torch.nn.Linear):
                layer.weight.normal_(0.0, 4.0 / layer.in_features ** 0.5)  # spread: frames are told apart
    torch_save(mlp.state_dict(), folder / "sac+logos+ava1-l14-linearMSE.pth")
    save_safetensors(openai_vision_to_transformers(reference.state_dict()), folder / "clip-vit-large-patch14.safetensors")
    target = folder / "laion_aesthetic_v2.safetensors"
    assert convert_main([str(folder / "sac+logos+ava1-l14-linearMSE.pth"),
                         str(folder / "clip-vit-large-patch14.safetensors"), str(target)]) == 0
    return reference, clip.clip._transform(224), mlp, load_reward_model(target)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return _setup(tmp_path_factory.mktemp("aesthetic"), TINY_OPENAI, (128, 32, 16, 8), seed=3)


@pytest.mark.parametrize("size", [(224, 224), (224, 303), (303, 224)], ids=str)
def test_scores_equal_reference_end_to_end(tiny, size):
    """Short side 224: OpenAI's preprocess only crops (torchvision rounds the offset: 79 / 2 -> 40)."""
    reference, preprocess, mlp, ours = tiny
    arrays = [_image(*size, seed=i) for i in range(3)]
    expected = torch.tensor(reference_scores(reference, preprocess, mlp, [Image.fromarray(a) for a in arrays]))
    got = ours.score(_tensor(arrays), "")  # the prompt is not used
    assert ours.name == "aesthetic" and torch.allclose(got, expected, atol=1e-4, rtol=0), (got, expected)
    assert float(expected.std()) > 1e-3


def test_resized_frames_match_reference_pixels_and_scores(tiny):
    reference, preprocess, mlp, ours = tiny
    arrays = [_image(480, 832, seed=20 + i) for i in range(2)]
    theirs = torch.stack([preprocess(Image.fromarray(a)) for a in arrays])
    pixels = ours.preprocess_frames(_tensor(arrays), "reference")
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    assert float(((pixels - theirs) * std).abs().mean()) < 1 / 255
    with torch.no_grad():
        expected = [float(mlp(torch.from_numpy(np.asarray(e) / np.linalg.norm(e)).float().unsqueeze(0))[0, 0])
                    for e in reference.encode_image(pixels).numpy()]
        got = ours.mlp(ours.image_features(pixels)).squeeze(-1)
    assert torch.allclose(got, torch.tensor(expected), atol=1e-4, rtol=0)


def test_score_is_differentiable(tiny):
    ours = tiny[3]
    frames = torch.rand(2, 3, 64, 96, requires_grad=True)
    ours.score(frames, ["a", "b"]).sum().backward()
    assert frames.grad is not None and float(frames.grad.abs().sum()) > 0


def test_mlp_file_alone_says_how_to_join_it(tmp_path):
    path = torch_save(AestheticMLP({0: (8, 4), 2: (1, 8)}).state_dict(), tmp_path / "sac+logos+ava1-l14-linearMSE.pth")
    with pytest.raises(UserFileError, match=r"sac\+logos\+ava1-l14-linearMSE\.pth: this is the LAION aesthetic "
                                            r"predictor's MLP alone.*convert_aesthetic"):
        load_reward_model(path)


def test_converter_refuses_an_encoder_of_the_wrong_width():
    mlp = AestheticMLP({0: (8, 768), 2: (1, 8)}).state_dict()
    clip = {"vision_model.embeddings.patch_embedding.weight": torch.zeros(4, 3, 2, 2),
            "visual_projection.weight": torch.zeros(1024, 4)}
    with pytest.raises(UserFileError, match="1024-d image embeddings but the MLP takes 768"):
        join_aesthetic(mlp, clip)
    with pytest.raises(UserFileError, match="no transformers vision tower"):
        join_aesthetic(mlp, {"visual.conv1.weight": torch.zeros(1)})


def test_real_configuration_from_shapes():
    """OpenAI's ViT-L/14 vision tower in the transformers layout, on the meta device: the inferred
    configuration is openai/clip-vit-large-patch14's, and the released MLP's 768 inputs fit it."""
    with torch.device("meta"):
        state_dict = build_hf_clip_vision(OPENAI_VIT_L_14_VISION_CONFIG).state_dict()
    params = {k: v for k, v in state_dict.items() if not k.endswith("position_ids")}
    assert sum(v.numel() for v in params.values()) == 303_966_208
    config = dict(infer_vision_config(params, base=OPENAI_VIT_L_14_VISION_CONFIG),
                  projection_dim=int(params["visual_projection.weight"].shape[0]))
    assert config == OPENAI_VIT_L_14_VISION_CONFIG


@pytest.mark.slow
def test_real_size_scores_equal_reference(tmp_path):
    """ViT-L/14 and the released MLP's sizes (768 -> 1024 -> 128 -> 64 -> 16 -> 1), random weights."""
    reference, preprocess, mlp, ours = _setup(tmp_path, REAL_OPENAI, (1024, 128, 64, 16), seed=5)
    arrays = [_image(224, 303, seed=30 + i) for i in range(2)]
    expected = torch.tensor(reference_scores(reference, preprocess, mlp, [Image.fromarray(a) for a in arrays]))
    assert torch.allclose(ours.score(_tensor(arrays), ""), expected, atol=1e-4, rtol=0)
