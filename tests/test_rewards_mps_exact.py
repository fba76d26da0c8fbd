"""MPS: our model equals the verbatim port of the official code (PyPI ``imscore``) on the same weights.

The reference side is imscore's ``XCLIPModel`` + ``CrossModel`` built offline from the
tiny config (no download), run with the official single-image recipe (threshold 0.3,
``logit_scale.exp() * cos``) and with imscore's/the reference trainer's ``forward`` (threshold 0.01).
Compared in fp32 on CPU: the condition mask first, then the scores.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from training.rewards import load_reward_model
from training.rewards.mps import CONDITION
from training.rewards.tiny import TINY_MPS_CLIP_CONFIG, TINY_MPS_CROSS_CONFIG, write_tiny_mps_checkpoint
from training.rewards.tokenizers import mps_tokenize

if importlib.util.find_spec("imscore") is None:
    pytest.skip("imscore not installed: python -m pip install --no-deps -r tests/requirements-reference.txt",
                allow_module_level=True)

PROMPTS = ["A red fox running through fresh snow at sunrise", "two hands holding a glowing lantern, 35mm photo",
           "abstract texture"]


def _build_reference(state_dict):
    from imscore.mps.cross import CrossModel
    from imscore.mps.model import CLIPModel, XCLIPModel
    from transformers import CLIPConfig

    reference = CLIPModel.__new__(CLIPModel)  # skip __init__: it downloads the laion weights
    torch.nn.Module.__init__(reference)
    reference.model = XCLIPModel(CLIPConfig(**TINY_MPS_CLIP_CONFIG))
    cross = TINY_MPS_CROSS_CONFIG
    reference.cross_model = CrossModel(dim=cross["dim"], layer_num=cross["layers"], dim_head=cross["dim_head"],
                                       heads=cross["heads"], ff_mult=cross["ff_mult"])
    result = reference.load_state_dict(state_dict, strict=False)
    assert not result.missing_keys and not result.unexpected_keys, result
    return reference.eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    path = tmp_path_factory.mktemp("mps") / "MPS_overall.safetensors"
    write_tiny_mps_checkpoint(path, seed=5)
    from safetensors.torch import load_file

    reference = _build_reference(load_file(str(path)))
    return reference, load_reward_model(path), load_reward_model(path, variant="videox_fun"), path


def _frames(seed: int, count: int = 2, height: int = 480, width: int = 832) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    smooth = F.interpolate(torch.rand(count, 3, height // 16, width // 16, generator=generator),
                           (height, width), mode="bilinear", align_corners=False)
    return (smooth + 0.1 * torch.rand(count, 3, height, width, generator=generator)).clamp(0, 1)


def _ours(path, threshold):
    model = load_reward_model(path)
    model.threshold = threshold  # 0.3 is official; with random tiny weights it keeps every token
    return model


def _reference_official(reference, pixels, prompt, threshold=0.3):
    """The official ``infer_one_sample`` recipe (B=1, threshold 0.3) on imscore's modules."""
    with torch.no_grad():
        ids, cond = mps_tokenize([prompt]), mps_tokenize([CONDITION])
        text_f, text_eos = reference.model.get_text_features(ids)
        image_f = reference.model.get_image_features(pixels.half())
        cond_f, _ = reference.model.get_text_features(cond)
        sim = torch.einsum("b i d, b j d -> b j i", text_f, cond_f)
        sim = torch.max(sim, dim=1, keepdim=True)[0]
        sim = sim / sim.max()
        mask = torch.where(sim > threshold, 0, float("-inf")).repeat(1, image_f.shape[1], 1)
        fused = reference.cross_model(image_f, text_f, mask.half())[:, 0, :]
        cosine = (F.normalize(text_eos, dim=-1) * F.normalize(fused, dim=-1)).sum(-1)
        return mask[0, 0] == 0, reference.logit_scale.exp() * cosine


@pytest.mark.parametrize("threshold", [0.3, 0.85])
def test_condition_mask_equals_reference(models, threshold):
    reference, _, _, path = models
    ours = _ours(path, threshold)
    pixels = ours.preprocess_frames(_frames(0, 1), "reference").float()
    kept = []
    for prompt in PROMPTS:
        expected_mask, _ = _reference_official(reference, pixels, prompt, threshold)
        _, _, mask = ours._prompt_features([prompt])
        got = mask[0, 0] == 0
        assert torch.equal(got, expected_mask), prompt
        kept.append(int(got.sum()))
    if threshold > 0.5:  # the threshold really selects tokens
        assert all(0 < k < 77 for k in kept), kept


@pytest.mark.parametrize("threshold", [0.3, 0.85])
def test_official_scores_equal_reference(models, threshold):
    reference, _, _, path = models
    ours = _ours(path, threshold)
    frames = _frames(1, 3)
    pixels = ours.preprocess_frames(frames, "reference").float()
    for prompt in PROMPTS:
        expected = torch.cat([_reference_official(reference, pixels[i:i + 1], prompt, threshold)[1]
                              for i in range(3)])
        got = ours.score(frames, [prompt] * 3)
        assert torch.allclose(got, expected, atol=1e-4, rtol=0), (prompt, got, expected)
    assert float(expected.std()) > 1e-3  # frames are told apart


def test_mps_tokenizer_matches_open_clip_ids_with_eot_padding():
    """The HF tokenizer built offline from open_clip's vocab (one code path for transformers 4.x and
    5.x) gives open_clip's ids for ordinary prompts, padded with <|endoftext|> (49407) instead of 0."""
    from training.rewards.tokenizers import hps_tokenize

    prompts = [PROMPTS[0], CONDITION, "a photo of 2 cats, 3 dogs and a bird"]
    ids, open_clip_ids = mps_tokenize(prompts), hps_tokenize(prompts)
    assert ids.shape == open_clip_ids.shape == (3, 77)
    used = open_clip_ids != 0
    assert torch.equal(ids[used], open_clip_ids[used]) and bool((ids[~used] == 49407).all())
    assert int(ids[0, 0]) == 49406 and int(used.sum(1).min()) > 5


def test_changed_threshold_changes_the_cached_score(models):
    """The prompt-feature cache is keyed by the threshold too: changing it after scoring takes effect."""
    _, _, _, path = models
    model, frames = _ours(path, 0.3), _frames(4, 1)
    before = model.score(frames, [PROMPTS[0]])
    model.threshold = 0.85
    after = model.score(frames, [PROMPTS[0]])
    assert torch.equal(after, _ours(path, 0.85).score(frames, [PROMPTS[0]]))
    assert not torch.allclose(before, after, atol=1e-4), (before, after)


def test_prompt_cache_is_bounded_lru(models):
    _, _, _, path = models
    model, frames = _ours(path, 0.3), _frames(4, 1)
    model.prompt_cache_size = 3
    first = model.score(frames, ["prompt 0"])
    for i in range(1, 6):
        model.score(frames, [f"prompt {i}"])
        model.score(frames, ["prompt 0"])  # recently used: stays
    assert [p for _, p in model._prompt_cache] == ["prompt 4", "prompt 5", "prompt 0"]
    assert torch.equal(model.score(frames, ["prompt 0"]), first)
    model.score(frames.expand(5, -1, -1, -1), [f"many {i}" for i in range(5)])  # more than fit at once
    assert len(model._prompt_cache) == 3


def test_videox_fun_variant_equals_reference_forward_per_sample(models):
    """imscore/reference ``forward`` (threshold 0.01) with one frame per call = our batched "videox_fun" variant."""
    reference, _, ours, _ = models
    frames = _frames(2, 3, 256, 256)
    pixels = ours.preprocess_frames(frames, "squash").float()
    prompts = PROMPTS
    expected = []
    with torch.no_grad():
        for i, prompt in enumerate(prompts):
            text_eos, fused = reference(mps_tokenize([prompt]), pixels[i:i + 1], mps_tokenize([CONDITION]))
            expected.append((F.normalize(text_eos, dim=-1) * F.normalize(fused, dim=-1)).sum(-1))
    got = ours.score(frames, prompts, preprocess="squash")
    assert torch.allclose(got, torch.cat(expected), atol=1e-4, rtol=0), (got, expected)
    # batch independence: each frame alone gives the same score as in the batch
    alone = torch.cat([ours.score(frames[i:i + 1], [p], preprocess="squash") for i, p in enumerate(prompts)])
    assert torch.allclose(got, alone, atol=1e-5)


def test_tensor_preprocessing_close_to_pil_reference(models):
    """Our differentiable short-side resize + centre crop vs transformers' PIL CLIP processor
    (the official pipeline): within a few /255 per pixel (PIL rounds to uint8)."""
    from transformers import CLIPImageProcessorPil

    _, ours, _, _ = models
    processor = CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224},
                                      resample=3, do_center_crop=True, do_normalize=True, do_rescale=True,
                                      image_mean=[0.48145466, 0.4578275, 0.40821073],
                                      image_std=[0.26862954, 0.26130258, 0.27577711])
    frames = (_frames(3, 1) * 255).round() / 255
    array = (frames[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    from PIL import Image

    expected = processor(images=Image.fromarray(array), return_tensors="pt").pixel_values
    got = ours.preprocess_frames(frames, "reference").float()
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    diff = ((got - expected) * std).abs() * 255  # in /255 units
    assert got.shape == expected.shape == (1, 3, 224, 224)
    assert float(diff.mean()) < 0.75 and float(diff.max()) < 8, (float(diff.mean()), float(diff.max()))
