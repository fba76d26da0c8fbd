"""Memory modes: where each model lives changes nothing in the results. sharded (the frozen expert
partitioned across 2 CPU processes under ZeRO-3) and low (the experts' Linear weights streamed from
host memory) give the loss and the LoRA gradients of fast, within 1e-5 in float32. With plain SGD the
step is -lr x gradient, so equal LoRAs after a step are equal gradients."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from training.demo import TEXT_DIM, write_tiny_run
from training.lora_format import read_lora
from training.tiny_models import tiny_wan_state_dict, wan_expert_shapes, write_sparse_safetensors
from training.trainer.config import config_from_dict
from training.trainer.memory_estimate import ZERO3_OFFLOAD, DeepSpeedShape, a14b_size, estimate
from training.trainer.placement import PlacementError, decide
from training.trainer.progress import EXIT_PREFLIGHT, Progress, parse_events
from training.trainer.recipe import RewardLoRARecipe
from training.trainer.stream import StreamedLinear

PACK = Path(__file__).resolve().parents[1]
ENTRY = PACK / "training" / "train_reward_lora.py"
ACCELERATE = Path(sys.executable).with_name("accelerate")
LR = 0.5


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("modes")
    config = yaml.safe_load(write_tiny_run(folder).read_text())
    config.update(max_steps=1, optimizer="sgd", learning_rate=LR, weight_decay=0.0, max_grad_norm=0.0,
                  validation_every=1, checkpoint_every=0, resume=False)
    return folder, config


def lora_of(path) -> dict[str, torch.Tensor]:
    return {k: v.float() for k, v in read_lora(path).tensors.items()}


def assert_same_run(a_events, b_events, a_lora, b_lora):
    a_steps = [e["loss"] for e in a_events if e["event"] == "step"]
    b_steps = [e["loss"] for e in b_events if e["event"] == "step"]
    assert a_steps and a_steps == pytest.approx(b_steps, abs=1e-5)
    a_val = [e["rewards"] for e in a_events if e["event"] == "validation"]
    b_val = [e["rewards"] for e in b_events if e["event"] == "validation"]
    assert [v["hps"] for v in a_val] == pytest.approx([v["hps"] for v in b_val], abs=1e-5)
    a, b = lora_of(a_lora), lora_of(b_lora)
    assert a.keys() == b.keys()
    for key in a:  # after one SGD step the LoRA is init - lr x gradient: equal gradients
        assert torch.allclose(a[key], b[key], atol=1e-5 * LR), key
    assert any(float(t.abs().max()) > 0 for k, t in a.items() if "lora_up" in k)  # the step moved it


def test_low_streams_the_experts_and_trains_as_fast(tiny):
    folder, config = tiny
    torch.set_num_threads(1)
    runs = {}
    for mode in ("fast", "low"):
        cfg = config_from_dict(dict(config, memory=mode, output_dir=str(folder / mode)))
        out = io.StringIO()
        recipe = RewardLoRARecipe(cfg, Progress(cfg.output_dir, stream=out)).setup()
        streamed = {name: sum(isinstance(m, StreamedLinear) for m in model.modules())
                    for name, model in recipe.experts.items()}
        if mode == "low":  # every Linear of both experts streams (the trained one's inside the LoRA wrappers)
            assert streamed["low"] > 20 and streamed["high"] > 20, streamed
            assert all(p.device.type == "cpu" for p in recipe.params)
        else:
            assert not any(streamed.values())
        assert recipe.train() == 0
        runs[mode] = parse_events(out.getvalue())
        assert runs[mode][0]["memory_mode"] == mode
    assert_same_run(runs["fast"], runs["low"], folder / "fast" / "tiny_reward_lora.safetensors",
                    folder / "low" / "tiny_reward_lora.safetensors")


def test_sharded_partitions_the_frozen_expert_and_trains_as_fast(tiny):
    if not ACCELERATE.exists():
        pytest.skip("accelerate launcher not installed beside this Python")
    folder, config = tiny
    runs = {}
    for mode in ("fast", "sharded"):
        path = folder / f"{mode}_2proc.yaml"
        path.write_text(yaml.safe_dump(dict(config, memory=mode, output_dir=str(folder / f"ds_{mode}"))))
        proc = subprocess.run([str(ACCELERATE), "launch", "--config_file",
                               "training/configs/accelerate_cpu_zero3_offload_2proc.yaml", str(ENTRY), "--config",
                               str(path)], capture_output=True, text=True, timeout=400, cwd=PACK,
                              env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[mode] = parse_events(proc.stdout)
    started = {mode: events[0] for mode, events in runs.items()}
    assert started["fast"]["frozen_local_fraction"] == 1.0
    assert 0.4 < started["sharded"]["frozen_local_fraction"] < 0.6  # each rank holds about half
    assert started["sharded"]["memory_mode"] == "sharded" and started["sharded"]["world_size"] == 2
    assert_same_run(runs["fast"], runs["sharded"], folder / "ds_fast" / "tiny_reward_lora.safetensors",
                    folder / "ds_sharded" / "tiny_reward_lora.safetensors")


def test_an_fp8_frozen_expert_stays_fp8_and_computes_as_its_dequantised_weights(tmp_path):
    from training.trainer.models import load_wan_expert
    from training.trainer.placement import Placement

    sd = tiny_wan_state_dict(seed=3, text_dim=TEXT_DIM)
    fp8 = {k: (v.to(torch.float8_e4m3fn) if v.ndim == 2 else v) for k, v in sd.items()}
    scaled = [k for k, v in fp8.items() if v.dtype == torch.float8_e4m3fn and k.startswith("blocks.")][:4]
    for key in scaled:  # some scaled, as in ComfyUI's fp8_scaled files
        fp8[key[: -len(".weight")] + ".scale_weight"] = torch.tensor(0.5)
    from training.safe_io import save_safetensors

    save_safetensors(fp8, tmp_path / "fp8.safetensors")
    kept = load_wan_expert(tmp_path / "fp8.safetensors", torch.float32, keep_fp8=True)
    plain = load_wan_expert(tmp_path / "fp8.safetensors", torch.float32)  # dequantised whole, for comparison
    # the blocks' Linears stay fp8 (20 in 2 tiny blocks), 4 of them with their scale
    assert len(kept.fp8_scales) == 20 and sum(s is not None for s in kept.fp8_scales.values()) == 4
    placed = Placement("fast", "", torch.device("cpu"), torch.float32).place_frozen(kept, kept.fp8_scales)
    weights = [m.weight for m in placed.modules() if isinstance(m, StreamedLinear)]
    assert weights and all(w.dtype == torch.float8_e4m3fn for w in weights)  # never a whole float copy
    gen = torch.Generator().manual_seed(0)
    x, t, ctx = torch.randn(1, 36, 2, 4, 4, generator=gen), torch.tensor([700.0]), torch.randn(1, 8, TEXT_DIM)
    with torch.no_grad():
        a = placed(x, t, ctx, return_dict=False)[0]
        b = plain(x, t, ctx, return_dict=False)[0]
    assert torch.allclose(a, b, atol=1e-5), float((a - b).abs().max())


# ---- the decision and the refusals -------------------------------------------------------------------

def test_auto_picks_the_fastest_mode_that_fits():
    size = a14b_size()
    assert decide(size, "auto", 1, 1, ZERO3_OFFLOAD, 80 * 0.95, None).mode == "fast"
    one_24 = decide(size, "auto", 1, 1, ZERO3_OFFLOAD, 24 * 0.95, 100.0)
    assert one_24.mode == "low" and "fast would need" in one_24.reason
    assert decide(size, "auto", 8, 8, ZERO3_OFFLOAD, 24 * 0.95, None).mode == "sharded"
    fast, low = estimate(size, "fast", 1, 1, ZERO3_OFFLOAD), estimate(size, "low", 1, 1, ZERO3_OFFLOAD)
    assert low.gpu_gib < 24 < fast.gpu_gib and low.parts["LoRA, gradients, AdamW"] == pytest.approx(6.4, abs=0.1)


def test_a_mode_that_cannot_fit_is_refused_naming_what_would():
    size = a14b_size()
    with pytest.raises(PlacementError) as info:
        decide(size, "fast", 1, 1, ZERO3_OFFLOAD, 22.0, 100.0)
    text = str(info.value)
    assert "memory mode fast needs about" in text and "22.0 GiB free per GPU" in text and "use low" in text
    with pytest.raises(PlacementError, match="low needs about .* 58.8 GiB host memory, but there are .* 16.0 GiB host"):
        decide(size, "low", 1, 1, ZERO3_OFFLOAD, 22.0, 16.0)
    with pytest.raises(PlacementError, match="sharded .* needs two or more"):
        decide(size, "sharded", 1, 1, ZERO3_OFFLOAD, 80.0, None)
    with pytest.raises(PlacementError, match="low .* one process, not 2"):
        decide(size, "low", 2, 2, DeepSpeedShape(), 80.0, None)


def test_a_refused_run_writes_nothing_into_its_folder(tmp_path):
    config = yaml.safe_load(write_tiny_run(tmp_path).read_text())
    for name in ("high_noise_model", "low_noise_model"):  # A14B experts (sparse): low needs ~2 x 28 GB of host
        big = tmp_path / f"{name}_a14b.safetensors"
        write_sparse_safetensors(big, wan_expert_shapes(dim=5120, ffn_dim=13824, num_layers=40, text_dim=TEXT_DIM))
        config[name] = str(big)
    config.update(memory="low", preflight=True, output_dir=str(tmp_path / "refused"), mixed_precision="no")
    path = tmp_path / "a14b_low.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = subprocess.run([sys.executable, str(ENTRY), "--config", str(path)], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    event = json.loads(proc.stdout.strip().splitlines()[-1])
    if proc.returncode != EXIT_PREFLIGHT:
        pytest.skip(f"this machine has the host memory for low ({event})")
    assert event["kind"] == "preflight" and "memory mode low needs about" in event["message"]
    assert "host memory" in event["message"]
    assert not (tmp_path / "refused").exists()


def test_check_only_reports_every_mode_and_what_auto_picks(tiny, tmp_path):
    folder, config = tiny
    path = tmp_path / "check.yaml"
    path.write_text(yaml.safe_dump(dict(config, output_dir=str(tmp_path / "check"))))
    proc = subprocess.run([sys.executable, str(ENTRY), "--config", str(path), "--check-only"], capture_output=True,
                          text=True, timeout=120)
    checked = json.loads(proc.stdout.strip().splitlines()[-1])
    assert checked["event"] == "checked" and checked["memory_mode"] == "fast"
    table = checked["memory"]
    assert set(table["estimates"]) == {"1", "2", "8"} and set(table["estimates"]["1"]) == {"fast", "low"}
    assert set(table["estimates"]["8"]) == {"fast", "sharded"}
    assert set(table["auto"]) == {f"{g}GB x{p}" for g in (24, 32, 48, 80) for p in (1, 2, 8)}


def test_the_readme_table_is_the_estimators():
    from training.trainer.placement import readme_table

    readme = (PACK / "README.md").read_text(encoding="utf-8").replace("\r\n", "\n")
    start, end = "<!-- memory-table:start -->\n", "<!-- memory-table:end -->"
    assert start in readme and end in readme, "README.md lost the generated memory table's markers"
    assert readme.split(start)[-1].split(end)[0] == readme_table(), (
        "README.md's memory table is stale: paste the output of python -m training.trainer.placement --readme "
        "between the markers")


def test_out_of_memory_in_a_step_names_the_mode_and_the_one_that_would_fit(tiny):
    folder, config = tiny
    cfg = config_from_dict(dict(config, max_steps=3, validation_every=0, output_dir=str(folder / "oom")))
    decision = decide(a14b_size(), "fast", 1, 1, ZERO3_OFFLOAD, None, None)  # an A14B run's estimates
    out = io.StringIO()
    torch.set_num_threads(1)
    recipe = RewardLoRARecipe(cfg, Progress(cfg.output_dir, stream=out), decision=decision).setup()
    real_loss, calls = recipe.stepper.loss, []

    def loss(step, micro):
        calls.append(step)
        if step == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_loss(step, micro)

    recipe.stepper.loss = loss
    assert recipe.train() == 1
    error = parse_events(out.getvalue())[-1]
    assert error["event"] == "error" and "OutOfMemoryError" in error["message"]
    assert "out of memory in memory mode fast" in error["message"]
    assert "memory mode low needs about" in error["message"] and "set memory: low" in error["message"]
    assert "the last good step (1) is saved" in error["message"]
