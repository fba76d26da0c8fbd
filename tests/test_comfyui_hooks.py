"""Wan Dual LoRA Step Schedule inside a real ComfyUI: the weights the model sees at each sampler step
(recorded by the test-only probe) equal W + strength * s(t) * alpha/rank * up @ down, with s(t) the
keyframe holding at that step's sigma (ComfyUI's percent -> sigma), before and after each keyframe."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tests.helpers.tiny_wan import expected_weight, linear_module_names, random_lora, tiny_wan_state_dict

pytestmark = pytest.mark.comfyui
MODULE = "blocks.0.self_attn.q"
SCHEDULE = [(0.0, 1.0), (0.3, 0.5), (0.6, -0.25)]


@pytest.fixture(scope="module")
def setup(comfyui):
    expert = tiny_wan_state_dict(seed=40, in_dim=16)
    save_file(expert, comfyui.model_path("diffusion_models", "tiny_hooks_t2v.safetensors"))
    lora = random_lora(expert, linear_module_names(), rank=4, alpha=2.0, seed=41)
    tensors = {}
    for module, (up, down, alpha) in lora.items():
        base = "lora_unet__" + module.replace(".", "_")
        tensors |= {f"{base}.lora_up.weight": up, f"{base}.lora_down.weight": down,
                    f"{base}.alpha": torch.tensor(alpha)}
    save_file(tensors, comfyui.model_path("loras", "hooks/scheduled-high-noise.safetensors"))
    return expert, lora


def _graph(schedule_text: str, record: str, keyframes=None, strength=0.8, interpolation="hold"):
    prompt = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "tiny_hooks_t2v.safetensors", "weight_dtype": "default"}},
        "2": {"class_type": "ProbeTinyUMT5Clip", "inputs": {"seed": 0}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 0], "text": "a red fox in the snow"}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 0], "text": ""}},
        "5": {"class_type": "WanRewardDualLoraStepSchedule", "inputs": {
            "model_high": ["1", 0], "model_low": ["1", 0], "positive": ["3", 0], "negative": ["4", 0],
            "lora_high": "hooks/scheduled-high-noise.safetensors", "strength_high": strength,
            "schedule_high": schedule_text, "lora_low": "None", "strength_low": 1.0, "schedule_low": "0.0:1.0",
            "interpolation": interpolation}},
        "6": {"class_type": "ProbeRecordSamplingWeights", "inputs": {
            "model": ["1", 0], "module": MODULE, "percents": "0.3,0.45,0.6", "filename": record}},
        "7": {"class_type": "EmptyHunyuanLatentVideo", "inputs": {"width": 32, "height": 32, "length": 5, "batch_size": 1}},
        "8": {"class_type": "KSampler", "inputs": {
            "model": ["6", 0], "positive": ["5", 0], "negative": ["5", 1], "latent_image": ["7", 0], "seed": 0,
            "steps": 6, "cfg": 2.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}},
        "9": {"class_type": "ProbeSaveLatent", "inputs": {"samples": ["8", 0], "filename": record + "_latent"}},
        "10": {"class_type": "PreviewAny", "inputs": {"source": ["5", 6]}},
    }
    if keyframes is not None:
        previous = None
        for i, (percent, strength_mult) in enumerate(keyframes):  # core's Create Hook Keyframe chain
            node = {"class_type": "CreateHookKeyframe", "inputs": {"strength_mult": strength_mult,
                                                                   "start_percent": percent}}
            if previous:
                node["inputs"]["prev_hook_kf"] = [previous, 0]
            previous = f"k{i}"
            prompt[previous] = node
        prompt["5"]["inputs"]["keyframes_high"] = [previous, 0]
    return prompt


def _recorded(comfyui, record):
    with safe_open(str(comfyui.output / f"{record}.safetensors"), "pt") as handle:
        meta = handle.metadata()
        weights = [handle.get_tensor(f"weight_{i}") for i in range(len(json.loads(meta["sigmas"])))]
    return json.loads(meta["sigmas"]), {float(k): v for k, v in json.loads(meta["thresholds"]).items()}, weights


def _held(schedule, thresholds, sigma):
    """ComfyUI's rule: the last keyframe whose start sigma (percent -> sigma) is at or above the step's sigma."""
    start = {0.0: float("inf"), **thresholds}
    return [s for p, s in schedule if start[p] >= sigma][-1]


@pytest.mark.parametrize("source", ["text", "core_keyframes"])
def test_scheduled_weights_equal_the_formula_at_every_step(comfyui, setup, source):
    expert, lora = setup
    schedule = SCHEDULE if source == "text" else [(0.0, 1.0), (0.45, 0.0)]
    text = ", ".join(f"{p}:{s}" for p, s in SCHEDULE)
    record = f"hooks_{source}"
    outputs = comfyui.run(_graph(text, record, keyframes=schedule if source != "text" else None))
    report = outputs["10"]["text"][0]
    assert "step schedule" in report and "modules matched: 26 of 26" in report, report
    sigmas, thresholds, weights = _recorded(comfyui, record)
    assert len(sigmas) >= 6
    up, down, alpha = lora[MODULE]
    strengths = []
    for sigma, weight in zip(sigmas, weights):
        s = _held(schedule, thresholds, sigma)
        strengths.append(s)
        want = expected_weight(expert[f"{MODULE}.weight"], up, down, alpha, 0.8 * s)
        assert torch.allclose(weight, want, atol=1e-5, rtol=0), (sigma, s, (weight - want).abs().max())
    assert len(set(strengths)) == len(schedule), (sigmas, thresholds, strengths)  # every keyframe was reached


def test_the_model_itself_is_not_patched_and_other_conditioning_carries_no_hooks(comfyui, setup):
    expert, _ = setup
    prompt = _graph("0.0:1.0", "hooks_low_conds")
    prompt["8"]["inputs"].update(positive=["5", 2], negative=["5", 3])  # the low expert's: lora_low is None
    comfyui.run(prompt)
    _, _, weights = _recorded(comfyui, "hooks_low_conds")
    assert all(torch.equal(w, expert[f"{MODULE}.weight"].float()) for w in weights)


def test_invalid_schedule_is_refused_naming_the_text(comfyui, setup):
    with pytest.raises(AssertionError, match=r"schedule_high = '0.5:1.0': the first keyframe must be at 0.0"):
        comfyui.queue(_graph("0.5:1.0", "never"))
    with pytest.raises(AssertionError, match=r"schedule_high = '0.0:1.0, 0.4:nan': strength of '0.4:nan' nan is "
                                             r"not a finite number"):
        comfyui.queue(_graph("0.0:1.0, 0.4:nan", "never"))
