"""HPS v2.1: our batched tensor scorer equals the real hpsv2 code on the same weights (fp32, CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers.reference_hpsv2 import build_reference_model, reference_scores
from training.rewards import load_reward_model
from training.rewards.tiny import TINY_HPS_CONFIG, write_tiny_hps_checkpoint

SIZES = [(480, 832), (1024, 1024), (300, 200), (224, 224), (832, 480), (50, 70)]  # H x W
PROMPTS = [
    "A red fox running through fresh snow at sunrise, cinematic lighting",
    "Tom &amp; Jerry chase each other, “curly quotes” and Ünïcödé",
    "a very long prompt " + " ".join(f"word{i}" for i in range(120)),
]


def _image(height: int, width: int, seed: int) -> np.ndarray:
    """Smooth colour gradients plus noise, uint8 HxWx3 (realistic-ish, not constant)."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width]
    base = np.stack([xs / width, ys / height, (xs + ys) / (width + height)], -1) * 200
    return np.clip(base + rng.normal(0, 25, (height, width, 3)), 0, 255).astype(np.uint8)


def _frames(arrays) -> list[torch.Tensor]:
    return [torch.from_numpy(a).permute(2, 0, 1).float().div(255).unsqueeze(0) for a in arrays]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hps_exact")
    checkpoint = tmp / "HPS_v2.1_compressed.pt"
    write_tiny_hps_checkpoint(checkpoint, seed=3)
    reference = build_reference_model(tmp, "wanreward-tiny-hps", TINY_HPS_CONFIG)
    ours = load_reward_model(checkpoint)
    return reference, ours, checkpoint


@pytest.mark.parametrize("prompt", PROMPTS, ids=["plain", "entities-unicode", "over-77-tokens"])
def test_scores_equal_reference_per_size(setup, prompt):
    (img_score, model, preprocess_val), ours, checkpoint = setup
    arrays = [_image(h, w, seed) for seed, (h, w) in enumerate(SIZES)]
    expected = reference_scores(img_score, model, preprocess_val, [Image.fromarray(a) for a in arrays],
                                prompt, checkpoint)
    got = [float(ours.score(frame, [prompt])[0]) for frame in _frames(arrays)]
    assert np.allclose(got, expected, atol=1e-5, rtol=0), (got, expected)
    assert len(set(np.round(expected, 6))) > 1  # the images are told apart


def test_batched_video_equals_reference(setup):
    """16 frames of one size scored in one batch equal the per-image reference."""
    (img_score, model, preprocess_val), ours, checkpoint = setup
    arrays = [_image(480, 832, 100 + i) for i in range(4)]
    expected = reference_scores(img_score, model, preprocess_val, [Image.fromarray(a) for a in arrays],
                                PROMPTS[0], checkpoint)
    frames = torch.cat(_frames(arrays))
    got = ours.score(frames, [PROMPTS[0]] * len(arrays))
    assert got.shape == (4,) and got.dtype == torch.float32
    assert torch.allclose(got, torch.tensor(expected), atol=1e-5, rtol=0), (got, expected)


def test_long_side_already_224_is_padded_like_the_reference_pads(setup):
    """224x150: the reference skips its pad when no resize is needed and then cannot score the
    image; we pad it, and equal the reference on the same image padded by hand (centred, black)."""
    (img_score, model, preprocess_val), ours, checkpoint = setup
    array = _image(224, 150, 21)
    with pytest.raises(RuntimeError, match="size of tensor"):  # 29 tokens vs 50 positional embeddings
        reference_scores(img_score, model, preprocess_val, [Image.fromarray(array)], PROMPTS[0], checkpoint)
    padded = np.zeros((224, 224, 3), np.uint8)
    padded[:, 37:187] = array  # left = pad_w // 2 = 37
    expected = reference_scores(img_score, model, preprocess_val, [Image.fromarray(padded)], PROMPTS[0], checkpoint)
    got = ours.score(_frames([array])[0], [PROMPTS[0]])
    assert torch.allclose(got, torch.tensor(expected), atol=1e-5, rtol=0), (got, expected)
    assert torch.equal(ours.preprocess_frames(_frames([array])[0], "reference"),
                       preprocess_val(Image.fromarray(padded)).unsqueeze(0))


def test_rgba_frames_score_as_their_rgb(setup):
    """RGBA: the reference keeps the alpha channel and cannot score it; we drop alpha (not composited),
    equal to the reference on the RGB image."""
    (img_score, model, preprocess_val), ours, checkpoint = setup
    array = _image(300, 200, 22)
    alpha = np.random.default_rng(0).integers(0, 256, (300, 200, 1), dtype=np.uint8)
    rgba = np.concatenate([array, alpha], -1)
    with pytest.raises(RuntimeError, match="4 channels"):
        reference_scores(img_score, model, preprocess_val, [Image.fromarray(rgba, "RGBA")], PROMPTS[0], checkpoint)
    expected = reference_scores(img_score, model, preprocess_val, [Image.fromarray(array)], PROMPTS[0], checkpoint)
    frames = torch.from_numpy(rgba).permute(2, 0, 1).float().div(255).unsqueeze(0)
    assert frames.shape == (1, 4, 300, 200)
    got = ours.score(frames, [PROMPTS[0]])
    assert torch.allclose(got, torch.tensor(expected), atol=1e-5, rtol=0), (got, expected)
    assert torch.equal(ours.preprocess_frames(frames, "squash"), ours.preprocess_frames(frames[:, :3], "squash"))


def test_our_open_clip_forward_equals_reference_model(setup):
    """Same state dict, same image tensor: open_clip 3.x (ours) vs hpsv2's vendored open_clip."""
    (img_score, model, preprocess_val), ours, _ = setup
    pixels = preprocess_val(Image.fromarray(_image(480, 832, 7))).unsqueeze(0)
    ours_pixels = ours.preprocess_frames(_frames([_image(480, 832, 7)])[0], "reference")
    assert torch.equal(pixels, ours_pixels)  # bit-exact preprocessing
    with torch.no_grad():
        expected = model.encode_image(pixels, normalize=True)
        got = ours.image_features(ours_pixels)
    assert torch.allclose(got, expected, atol=1e-6)


def test_squash_equals_reference_for_square_frames(setup):
    _, ours, _ = setup
    frames = _frames([_image(256, 256, 11)])[0]
    assert torch.allclose(ours.score(frames, ["a cat"], preprocess="squash"),
                          ours.score(frames, ["a cat"], preprocess="reference"), atol=1e-6)
    wide = _frames([_image(256, 448, 12)])[0]
    assert not torch.allclose(ours.score(wide, ["a cat"], preprocess="squash"),
                              ours.score(wide, ["a cat"], preprocess="reference"), atol=1e-4)


def test_gradient_ascent_on_pixels_raises_the_score(setup):
    _, ours, _ = setup
    pixels = torch.full((1, 3, 224, 224), 0.5, requires_grad=True)
    optimizer = torch.optim.Adam([pixels], lr=0.02)
    start = float(ours.score(pixels.detach(), ["a red fox"]))
    for _ in range(10):
        loss = -ours.score(pixels.clamp(0, 1), ["a red fox"]).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert float(ours.score(pixels.detach().clamp(0, 1), ["a red fox"])) > start + 0.05
