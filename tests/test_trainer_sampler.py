"""The sampler: schedule and windows as the reference's, straight-through gradient equal to the
reference's full graph, no graph after the window, CFG correct for batch > 1; model loading."""

from __future__ import annotations

import random

import pytest
import torch

from training.safe_io import save_safetensors
from training.tiny_models import tiny_vae_state_dict, tiny_wan_state_dict
from training.trainer.models import decode_latents, load_wan_expert, load_wan_vae, pad_context
from training.trainer.sampler import CFGDenoiser, backprop_window, make_schedule, sample


def test_schedule_and_windows_match_the_seed():
    schedule = make_schedule(40, 5.0, 0.9)
    assert schedule.experts.count("high") == 14  # indices 0-13, t >= 900
    assert float(schedule.timesteps[13]) == pytest.approx(909.71, abs=0.01)
    assert float(schedule.timesteps[14]) == pytest.approx(899.98, abs=0.01)
    rng = random.Random(0)
    assert backprop_window(schedule, "low", "tail", 1, 5, rng) == (39, 40)
    assert backprop_window(schedule, "high", "tail", 1, 5, rng) == (13, 14)
    assert backprop_window(schedule, "low", "tail", 3, 5, rng) == (37, 40)
    for _ in range(20):
        start, end = backprop_window(schedule, "high", "random", 1, 4, rng)
        assert end == start + 1 and 10 <= start <= 13


class ToyExpert(torch.nn.Module):
    """v = tanh(W x) * (1 + t/1000): records whether gradients were on at each call."""

    def __init__(self, seed):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.w = torch.nn.Parameter(torch.randn(4, 4, generator=gen) * 0.5)
        self.grad_modes = []

    def forward(self, x, t):
        self.grad_modes.append(torch.is_grad_enabled())
        return torch.tanh(torch.einsum("ij,bj...->bi...", self.w, x)) * (1 + t / 1000)


def test_straight_through_equals_seed_gradient_and_keeps_no_graph_after_window():
    schedule = make_schedule(10, 5.0, 0.9)
    experts = {"high": ToyExpert(1), "low": ToyExpert(2)}
    denoise = lambda x, t, e: experts[e](x, t)  # noqa: E731
    noise = torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(0))
    target = torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(1))
    for expert in ("high", "low"):
        window = backprop_window(schedule, expert, "tail", 2, 1, random.Random(0))
        trained = experts[expert]
        other = experts["low" if expert == "high" else "high"]
        trained.w.grad = None
        trained.grad_modes.clear()
        other.grad_modes.clear()
        out = sample(denoise, noise, schedule, window)
        other_modes = list(other.grad_modes)
        ((out - target) ** 2).sum().backward()
        ours = trained.w.grad.clone()
        modes = list(trained.grad_modes)

        # the reference: every step with gradients on, predictions outside the window detached,
        # the latent chain never detached
        trained.w.grad = None
        x = noise.clone()
        for i in range(schedule.steps):
            v = denoise(x, schedule.timesteps[i], schedule.experts[i])
            if not (window[0] <= i < window[1]):
                v = v.detach()
            x = x + (schedule.sigmas[i + 1] - schedule.sigmas[i]) * v
        ((x - target) ** 2).sum().backward()
        assert torch.allclose(out, x, atol=1e-6)
        assert torch.allclose(ours, trained.w.grad, atol=1e-6, rtol=1e-5)
        assert ours.abs().sum() > 0
        # our run: gradients on only inside the window (for the trained expert's calls)
        own_steps = [i for i, e in enumerate(schedule.experts) if e == expert]
        expected = [window[0] <= i < window[1] for i in own_steps]
        assert modes == expected
        assert other_modes and not any(other_modes)  # e.g. the low expert after a high window


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    sd = tiny_wan_state_dict(seed=0, text_dim=32)
    save_safetensors({k: v.to(torch.bfloat16) for k, v in sd.items()}, folder / "expert_bf16.safetensors")
    # fp8 "scaled": weight = fp8 / scale stored, scale_weight per tensor, plus the marker key
    scaled = {}
    for key, value in sd.items():
        if key.endswith(".weight") and value.ndim == 2:
            scale = value.abs().max() / 448.0
            scaled[key] = (value / scale).to(torch.float8_e4m3fn)
            scaled[key[:-7] + ".scale_weight"] = scale.reshape(1)
        else:
            scaled[key] = value.to(torch.bfloat16)
    scaled["scaled_fp8"] = torch.zeros(0, dtype=torch.float8_e4m3fn)
    save_safetensors({("model.diffusion_model." + k if k != "scaled_fp8" else k): v for k, v in scaled.items()},
                     folder / "expert_fp8_scaled.safetensors")
    save_safetensors(tiny_vae_state_dict(seed=0), folder / "vae.safetensors")
    return folder, sd, scaled


def test_fp8_scaled_expert_is_dequantised(tiny_files):
    folder, sd, scaled = tiny_files
    model = load_wan_expert(folder / "expert_fp8_scaled.safetensors", torch.float32)
    q = model.blocks[0].attn1.to_q.weight
    expected = scaled["blocks.0.self_attn.q.weight"].float() * scaled["blocks.0.self_attn.q.scale_weight"]
    assert torch.equal(q, expected)
    assert (q - sd["blocks.0.self_attn.q.weight"]).abs().max() < 0.1 * sd["blocks.0.self_attn.q.weight"].abs().max()
    assert model.config.in_channels == 36 and model.config.text_dim == 32 and model.config.num_layers == 2


def test_cfg_is_correct_for_batch_above_one(tiny_files):
    folder, _, _ = tiny_files
    model = load_wan_expert(folder / "expert_bf16.safetensors", torch.float32)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 2, 4, 4, generator=gen)
    ctx = pad_context([torch.randn(5, 32, generator=gen), torch.randn(7, 32, generator=gen)], 16)
    neg = pad_context([torch.randn(1, 32, generator=gen)] * 2, 16)
    cond = torch.zeros(2, 20, 2, 4, 4)
    t = torch.tensor(500.0)
    with torch.no_grad():
        both = CFGDenoiser({"low": model}, ctx, neg, 5.0, cond, torch.float32)(x, t, "low")
        for i in range(2):
            one = CFGDenoiser({"low": model}, ctx[i:i + 1], neg[i:i + 1], 5.0, cond[i:i + 1], torch.float32)(
                x[i:i + 1], t, "low")
            assert torch.allclose(both[i:i + 1], one, atol=1e-5)
            # and equals uncond + g * (cond - uncond) computed by hand
            u = model(torch.cat([x[i:i + 1], cond[i:i + 1]], 1), t.expand(1), neg[i:i + 1], return_dict=False)[0]
            c = model(torch.cat([x[i:i + 1], cond[i:i + 1]], 1), t.expand(1), ctx[i:i + 1], return_dict=False)[0]
            assert torch.allclose(one, u + 5.0 * (c - u), atol=1e-5)


def test_vae_decode_is_differentiable(tiny_files):
    folder, _, _ = tiny_files
    vae = load_wan_vae(folder / "vae.safetensors")
    latents = torch.randn(1, 16, 2, 4, 4, requires_grad=True)
    frames = decode_latents(vae, latents[:, :, :1])
    assert frames.shape == (1, 3, 1, 32, 32)
    assert 0 <= float(frames.detach().min()) and float(frames.detach().max()) <= 1
    frames.mean().backward()
    assert latents.grad[:, :, 0].abs().sum() > 0 and latents.grad[:, :, 1].abs().sum() == 0
