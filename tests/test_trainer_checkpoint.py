"""Checkpoints and resume: starting over never mixes runs, a changed config is refused naming
the fields, re-saving a step is atomic and latest_checkpoint survives a dangling latest.json;
the best LoRA never is worse than the base; errors from model files name the config field."""

from __future__ import annotations

import dataclasses

import io
import json
from pathlib import Path

import pytest
import torch
import yaml

from training.demo import write_tiny_run
from training.safe_io import save_safetensors
from training.tiny_models import tiny_wan_state_dict
from training.trainer.checkpoint import (
    CheckpointMismatch,
    latest_checkpoint,
    recent_loras,
    save_checkpoint,
    step_dirs,
)
from training.trainer.config import ConfigError, load_config
from training.trainer.components import load_rewards
from training.trainer.recipe import train
from training.trainer.progress import Progress, parse_events


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    write_tiny_run(folder)
    return folder


def _config(folder: Path, name: str, **overrides) -> Path:
    base = yaml.safe_load((folder / "run.yaml").read_text())
    base.update(dict(validation_every=0, output_dir=str(folder / name), max_steps=2, checkpoint_every=1,
                     checkpoints_keep=2, inference_steps=4, backprop_steps=1), **overrides)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(base))
    return path


def _train(path: Path, reward_loader=load_rewards) -> list[dict]:
    cfg = load_config(path)
    out = io.StringIO()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert train(cfg, Progress(cfg.output_dir, stream=out), reward_loader=reward_loader) == 0
    finally:
        torch.set_num_threads(threads)
    return parse_events(out.getvalue())


def test_resume_false_moves_the_old_checkpoints_aside(tiny):
    _train(_config(tiny, "over", max_steps=3))  # old run: step-2, step-3 kept
    old_lora = (tiny / "over" / "checkpoints" / "step-000003" / "lora.safetensors").read_bytes()
    events = _train(_config(tiny, "over", max_steps=1, resume=False, average_last_checkpoints=2))
    started = events[0]
    assert started["step"] == 0 and started["resumed_from"] is None
    aside = Path(started["replaced_checkpoints"])
    assert aside.name.startswith("checkpoints-replaced-")
    assert (aside / "step-000003" / "lora.safetensors").read_bytes() == old_lora  # kept whole, not mixed
    assert any(e["event"] == "warning" and str(aside) in e["message"] for e in events)
    root = tiny / "over" / "checkpoints"
    assert [p.name for p in step_dirs(root)] == ["step-000001"]  # the new step survives pruning
    assert json.loads((root / "latest.json").read_text())["step"] == 1
    assert recent_loras(tiny / "over", 2) == [root / "step-000001" / "lora.safetensors"]
    assert events[-1]["average_lora_path"] is None  # nothing of the old run is averaged


def test_resume_with_a_changed_config_is_refused_naming_the_fields(tiny):
    _train(_config(tiny, "changed", max_steps=1))
    cfg = load_config(_config(tiny, "changed", max_steps=2, learning_rate=5e-3, lora_rank=8))
    with pytest.raises(CheckpointMismatch) as info:
        train(cfg, Progress(cfg.output_dir, stream=io.StringIO()))
    assert isinstance(info.value, ConfigError) and info.value.field == "learning_rate"
    assert "learning_rate" in str(info.value) and "lora_rank" in str(info.value) and "resume: false" in str(info.value)
    # harmless changes resume: more steps, other intervals
    events = _train(_config(tiny, "changed", max_steps=2, checkpoint_every=2, checkpoints_keep=3))
    assert events[0]["step"] == 1 and events[0]["resumed_from"].endswith("step-000001")
    assert [e["step"] for e in events if e["event"] == "step"] == [2]


class _Accel:
    is_main_process, process_index = True, 0

    def wait_for_everyone(self):
        pass


class _Lora(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q = torch.nn.Module()
        self.q.lora_A = torch.nn.ModuleDict({"default": torch.nn.Linear(4, 2, bias=False)})
        self.q.lora_B = torch.nn.ModuleDict({"default": torch.nn.Linear(2, 4, bias=False)})


def _save(tmp_path, step, writer=None, value=0.0):
    model = _Lora()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    writer = writer or (lambda p: save_safetensors({"v": torch.tensor([value])}, p))
    return save_checkpoint(_Accel(), model, optimizer, scheduler, step, tmp_path, writer, 2, False, {"config": {}})


def test_resaving_a_step_is_atomic_and_latest_falls_back(tmp_path):
    from safetensors.torch import load_file

    root = tmp_path / "checkpoints"
    _save(tmp_path, 2, value=1.0)
    _save(tmp_path, 3, value=2.0)

    def crash(path):
        raise RuntimeError("killed while writing")

    with pytest.raises(RuntimeError):
        _save(tmp_path, 3, writer=crash, value=9.0)  # a rerun re-saving step 3 dies half-way
    assert latest_checkpoint(tmp_path) == root / "step-000003"
    assert float(load_file(root / "step-000003" / "lora.safetensors")["v"]) == 2.0
    final = _save(tmp_path, 3, value=3.0)  # the re-save completes: new content, no leftovers
    assert float(load_file(final / "lora.safetensors")["v"]) == 3.0
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["step-000002", "step-000003"]

    # killed between renaming the old folder aside and renaming the new one in
    (root / "step-000003").rename(root / ".replaced-step-000003")
    assert latest_checkpoint(tmp_path) == root / ".replaced-step-000003"
    (root / "latest.json").unlink()  # and without latest.json at all
    assert latest_checkpoint(tmp_path) == root / ".replaced-step-000003"
    (root / ".replaced-step-000003").rename(root / "step-000003")
    (root / "step-000003" / "run.json").unlink()  # incomplete: not a candidate
    assert latest_checkpoint(tmp_path) == root / "step-000002"


class _FakeReward(torch.nn.Module):
    """Differentiable training reward (mean brightness) or a held-out reward that falls at
    every call: the base model then scores best on the held-out criterion."""

    def __init__(self, name, falling=False):
        super().__init__()
        self.name, self.falling, self.calls = name, falling, 0

    def score(self, frames, prompts):
        if self.falling:
            self.calls += 1
            return torch.full((frames.shape[0],), 1.0 - 0.01 * self.calls)
        return frames.mean(dim=(1, 2, 3))


def _fake_loader(specs, device, dtype, field_name):
    return [(spec, _FakeReward(spec.model, falling=field_name == "held_out_rewards")) for spec in specs]


def test_a_lora_worse_than_the_base_never_becomes_best(tiny):
    events = _train(_config(tiny, "best", max_steps=2, validation_every=1, checkpoint_every=2), _fake_loader)
    validations = [e for e in events if e["event"] == "validation"]
    assert [v["step"] for v in validations] == [0, 1, 2]
    assert not any(v["best"] for v in validations) and all(v["best_step"] == 0 for v in validations)
    assert all("held_out_rewards" in v["criterion"] for v in validations)
    assert events[-1]["best_lora_path"] is None and not load_config(tiny / "best.yaml").best_lora_path.exists()
    info = json.loads((tiny / "best" / "checkpoints" / "step-000002" / "run.json").read_text())
    assert info["best"]["step"] == 0 and info["guard"]["previous"] is not None

    events = _train(_config(tiny, "crit", max_steps=1, validation_every=1, held_out_rewards=[]), _fake_loader)
    validation = [e for e in events if e["event"] == "validation"][-1]
    assert "no held_out_rewards" in validation["criterion"]
    assert validation["best_score"] >= validation["criterion_value"]


def _expect_config_error(path: Path, field: str, *words: str):
    """The config check (model files by their contents) or, for what needs the models, training refuses."""
    with pytest.raises(ConfigError) as info:
        cfg = load_config(path)
        train(cfg, Progress(cfg.output_dir, stream=io.StringIO()))
    assert info.value.field == field, str(info.value)
    for word in words:
        assert word in str(info.value)


def test_model_file_errors_name_the_config_field(tiny):
    models = tiny / "models"
    broken = models / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    _expect_config_error(_config(tiny, "e1", high_noise_model=str(broken)), "high_noise_model", str(broken))
    narrow = models / "text32.safetensors"
    save_safetensors(tiny_wan_state_dict(seed=5, text_dim=32), narrow)
    _expect_config_error(_config(tiny, "e2", low_noise_model=str(narrow)), "low_noise_model", "32", "64")
    t2v = models / "t2v16.safetensors"
    save_safetensors(tiny_wan_state_dict(seed=6, text_dim=64, in_dim=16), t2v)
    _expect_config_error(_config(tiny, "e3", high_noise_model=str(t2v)), "low_noise_model", "16", "36")
    _expect_config_error(_config(tiny, "e4", lora_targets=["self_attn.q", "self_attn.qq"]), "lora_targets",
                         "self_attn.qq")
    _expect_config_error(_config(tiny, "e5", vae=str(broken)), "vae", str(broken))
    _expect_config_error(_config(tiny, "e6", mixed_precision="fp16"), "mixed_precision", "DeepSpeed")
    (tiny / "e7" / "checkpoints" / "step-000005").mkdir(parents=True)  # an older trainer's, no run.json
    _expect_config_error(_config(tiny, "e7"), "resume", "step-000005", "resume: false")


def test_quantisation_scales(tmp_path):
    from training.safe_io import UserFileError
    from training.trainer.models import dequantize

    w = torch.randn(4, 4)
    out = dequantize({"a.weight": w.to(torch.float8_e4m3fn), "a.scale_weight": torch.tensor([0.5]),
                      "a.scale_input": torch.tensor([3.0]), "scaled_fp8": torch.zeros(2)}, torch.float32)
    assert set(out) == {"a.weight"}  # scale_input only scales ComfyUI's fp8 matmul input
    assert torch.equal(out["a.weight"], w.to(torch.float8_e4m3fn).float() * 0.5)
    with pytest.raises(UserFileError, match="a.weight_scale"):
        dequantize({"a.weight": w, "a.weight_scale": torch.tensor(1.0)}, torch.float32, "Wan expert x")


def test_the_estimate_reads_fp8_from_the_header_and_counts_the_lora(tmp_path):
    from training.trainer.lora import add_lora, lora_parameters
    from training.trainer.memory_estimate import DeepSpeedShape, estimate, run_size
    from training.trainer.models import load_wan_expert

    sd = tiny_wan_state_dict(seed=0, text_dim=64)
    save_safetensors({k: v.to(torch.bfloat16) for k, v in sd.items()}, tmp_path / "a.safetensors")
    save_safetensors({k: v.to(torch.float8_e4m3fn) for k, v in sd.items()}, tmp_path / "b.safetensors")  # no "fp8" in the name
    cfg = load_config(write_tiny_run(tmp_path, text_encoder=None))
    bf16 = run_size(dataclasses.replace(cfg, low_noise_model=str(tmp_path / "a.safetensors")))
    fp8 = run_size(dataclasses.replace(cfg, low_noise_model=str(tmp_path / "b.safetensors")))
    assert (bf16.trained.file_bytes_per_value, fp8.trained.file_bytes_per_value) == (2, 1)
    assert bf16.trained.params == fp8.trained.params == sum(v.numel() for v in sd.values())
    model = load_wan_expert(tmp_path / "a.safetensors", torch.float32)
    add_lora(model, cfg.lora_rank, 4.0, "all_linear", ["ffn"])
    assert bf16.lora_params == sum(p.numel() for p in lora_parameters(model).values())
    plain = estimate(bf16, "fast", 1, 1, DeepSpeedShape())
    offload = estimate(bf16, "fast", 1, 1, DeepSpeedShape(stage=3, offload_param=True, offload_optimizer=True))
    # offloaded: the trained expert and AdamW's states leave the GPU; the rewards count at their real size
    assert "trained expert" in plain.parts and "AdamW states" in plain.parts
    assert offload.parts["trained expert (ZeRO-3)"] == 0 and "AdamW states" not in offload.parts
    assert plain.parts["reward models"] > 2 * 0.99e9 * 4 / 1024 ** 3 * 0.9


def test_validation_decodes_once_with_the_same_reward_frames(tiny):
    from training.trainer.step import RewardStep
    from training.trainer.models import decode_latents, load_wan_vae

    cfg = load_config(_config(tiny, "dec", frames=9, decoded_latents=2, reward_frames=3))
    vae = load_wan_vae(cfg.vae, torch.float32)
    trainer = RewardStep.__new__(RewardStep)
    trainer.cfg, trainer.vae = cfg, vae
    latents = torch.randn(1, 16, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        only_decoded = trainer.reward_frames(trainer.decode(latents, cfg.decoded_latents))
        assert torch.allclose(only_decoded, trainer.reward_frames(decode_latents(vae, latents)), atol=1e-6)
