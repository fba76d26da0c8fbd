"""The motion-preserving term: zero while the LoRA is off (the trajectory is the base model's), a
gradient into the LoRA once its video moves less than the base model's from the same noise."""

from __future__ import annotations

import io

import pytest
import torch
import yaml

from training.demo import write_tiny_run
from training.rewards.motion import motion_energy, motion_hinge
from training.trainer.config import config_from_dict
from training.trainer.components import adapt, load_rewards
from training.trainer.recipe import train
from training.trainer.step import RewardStep
from training.trainer.lora import lora_parameters
from training.trainer.models import load_wan_expert, load_wan_vae, read_prompt_embeddings
from training.trainer.progress import Progress, parse_events


def test_hinge_is_zero_at_or_above_the_base_motion_and_pulls_up_below_it():
    base = torch.rand(1, 3, 3, 8, 8)
    assert float(motion_hinge(base, base)) == 0.0
    assert float(motion_hinge(base * 2, base)) == 0.0  # more motion than the base: no penalty
    still = (base[:, :1].repeat(1, 3, 1, 1, 1) + 0.1 * (base - base[:, :1])).requires_grad_(True)
    term = motion_hinge(still, base)
    assert 0.9 < float(term.detach()) < 1.0  # 1 - 0.01 of the energy
    term.backward()
    assert float(still.grad.abs().max()) > 0
    assert torch.allclose(motion_energy(base), (base[:, 1:] - base[:, :-1]).pow(2).flatten(1).mean(1))


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    folder = tmp_path_factory.mktemp("motion")
    config = yaml.safe_load(write_tiny_run(folder).read_text())
    config.update(frames=9, motion_weight=1.0, motion_latents=3, validation_every=0, held_out_rewards=[])
    cfg = config_from_dict(config)
    experts = {n: load_wan_expert(getattr(cfg, f"{n}_noise_model"), torch.float32) for n in ("high", "low")}
    torch.manual_seed(0)
    adapt(cfg, experts["low"])
    trainer = RewardStep(cfg, experts, load_wan_vae(cfg.vae, torch.float32),
                            load_rewards(cfg.rewards, "cpu", torch.float32, "rewards"),
                            read_prompt_embeddings(cfg.prompt_embeddings), cfg.prompts, torch.device("cpu"), 0)
    return folder, config, trainer


def test_the_term_is_zero_while_the_lora_is_off(stack):
    _, _, trainer = stack
    _, _, parts, _ = trainer.loss(0, 0)  # a fresh LoRA (up = 0) changes nothing
    assert parts["motion_term"] == 0.0


def test_the_term_has_gradient_into_the_lora_when_motion_drops(stack):
    _, _, trainer = stack
    params = lora_parameters(trainer.experts["low"])
    gen = torch.Generator().manual_seed(11)
    for seed in range(20):  # a LoRA under which the video moves less than the base model's
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(torch.randn(p.shape, generator=gen) * (0.3 if "lora_B" in name else 1.0))
        for p in params.values():
            p.grad = None
        loss, _, parts, _ = trainer.loss(seed, 0)
        if parts["motion_term"] > 0:
            break
    else:
        pytest.fail("no LoRA of 20 random ones lowered the motion")
    term = trainer.cfg.motion_weight * parts["motion_term"]
    loss.backward()
    assert term > 0 and max(float(p.grad.abs().max()) for p in params.values() if p.grad is not None) > 0


def test_a_run_reports_the_term_and_the_validation_reports_motion(stack):
    folder, config, _ = stack
    cfg = config_from_dict(dict(config, max_steps=2, validation_every=2, output_dir=str(folder / "run"),
                                resume=False))
    out = io.StringIO()
    torch.set_num_threads(1)
    assert train(cfg, Progress(cfg.output_dir, stream=out)) == 0
    events = parse_events(out.getvalue())
    steps = [e for e in events if e["event"] == "step"]
    assert all("motion_term" in e and "motion_term" not in e["rewards"] for e in steps)
    validations = [e for e in events if e["event"] == "validation"]
    assert validations and all(isinstance(v["motion"], float) for v in validations)
