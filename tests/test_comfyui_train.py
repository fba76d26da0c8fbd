"""Reward LoRA Train inside a real ComfyUI: a tiny 2-process CPU training end to end, the LoRA in the
loader's list and loading with zero unmatched keys, Cancel leaving no trainer process, resume; and the
trainer's LoRA, applied to ComfyUI's own WanModel at strength 1, changes ComfyUI's output exactly as the
adapters change the trainer's (diffusers) model."""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
import time

import pytest
import requests
import torch
from safetensors.torch import load_file, save_file

from tests.helpers.comfyui_server import comfyui_path
from tests.helpers.comfyui_train import PROMPTS, VALIDATION_PROMPTS, train_prompt, write_tiny_models
from training.lora_format import save_canonical_lora
from training.safe_io import save_safetensors
from training.tiny_models import tiny_wan_state_dict
from training.trainer.lora import add_lora, lora_parameters, lora_state, native_modules
from training.trainer.models import load_wan_expert

pytestmark = [pytest.mark.comfyui, pytest.mark.usefixtures("no_prompt_left_running")]


@pytest.fixture(scope="module")
def tiny_models(comfyui):
    return write_tiny_models(comfyui)


def _events(comfyui, name):
    path = comfyui.output / "wan_reward_lora" / name / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _trainer_pids(marker: str) -> list[int]:
    """Live processes whose command line names this run's folder (the trainer and its ranks)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                cmd = handle.read().decode(errors="replace")
            with open(f"/proc/{entry}/stat") as handle:
                state = handle.read().rsplit(")", 1)[-1].split()[0]
        except OSError:
            continue
        if marker in cmd and state != "Z":
            pids.append(int(entry))
    return pids


def test_train_node_registered(comfyui):
    info = comfyui.object_info()["WanRewardLoraTrain"]
    assert info["display_name"] == "Reward LoRA Train"
    assert info["output"] == ["COMBO", "IMAGE", "STRING", "COMBO", "INT"]
    assert info["input"]["required"]["deepspeed"][1]["options"] == ["zero3_offload", "zero3", "zero2", "none"]


def test_tiny_training_end_to_end_and_lora_loads(tiny_models):
    comfyui = tiny_models
    # the default preset (ZeRO-3 + CPU offload) on 2 CPU processes; train, then load the result in one prompt
    graph = train_prompt("tiny_e2e", steps=3, deepspeed="zero3_offload")
    graph.update({
        "2": {"class_type": "UNETLoader", "inputs": {"unet_name": "tiny_train_high.safetensors", "weight_dtype": "default"}},
        "3": {"class_type": "UNETLoader", "inputs": {"unet_name": "tiny_train_low.safetensors", "weight_dtype": "default"}},
        "4": {"class_type": "WanRewardDualLoraLoader", "inputs": {
            "model_high": ["2", 0], "model_low": ["3", 0], "lora_high": "None", "strength_high": 0.0,
            "lora_low": ["1", 0], "strength_low": 1.0}},
        "5": {"class_type": "PreviewAny", "inputs": {"source": ["4", 2]}},
    })
    outputs = comfyui.run(graph, timeout=300)
    report = outputs["5"]["text"][0]
    assert "keys unmatched: 0;" in report and "shape mismatches: 0" in report, report
    scores = json.loads(outputs["1"]["text"][0])
    assert scores["steps"] == 3 and scores["reason"] == "completed"
    assert outputs["1"]["images"], "the reward curve preview is missing"
    events = _events(comfyui, "tiny_e2e")
    started = next(e for e in events if e["event"] == "started")
    assert started["world_size"] == 2 and started["deepspeed"]
    assert [e["step"] for e in events if e["event"] == "step"] == [1, 2, 3]
    # the loader lists it ...
    assert "tiny_e2e.safetensors" in comfyui.get("/models/loras").json()
    lora_options = comfyui.object_info()["WanRewardDualLoraLoader"]["input"]["required"]["lora_low"]
    assert "tiny_e2e.safetensors" in json.dumps(lora_options)
    # ... and loads it from the list with zero unmatched keys
    graph = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "tiny_train_high.safetensors", "weight_dtype": "default"}},
        "2": {"class_type": "UNETLoader", "inputs": {"unet_name": "tiny_train_low.safetensors", "weight_dtype": "default"}},
        "3": {"class_type": "WanRewardDualLoraLoader", "inputs": {
            "model_high": ["1", 0], "model_low": ["2", 0], "lora_high": "None", "strength_high": 0.0,
            "lora_low": "tiny_e2e.safetensors", "strength_low": 1.0}},
        "4": {"class_type": "PreviewAny", "inputs": {"source": ["3", 2]}},
    }
    report = comfyui.run(graph)["4"]["text"][0]
    assert "keys unmatched: 0;" in report and "shape mismatches: 0" in report, report
    assert "modules matched: 0 of" not in report


def test_bad_inputs_are_node_errors(tiny_models):
    comfyui = tiny_models
    message = comfyui.run_expecting_error(train_prompt("../escape", steps=1))
    assert "output_name" in message and "no folders" in message
    message = comfyui.run_expecting_error(train_prompt("tiny_bad", steps=1, frames=6))
    assert "frames" in message and "4k+1" in message
    message = comfyui.run_expecting_error(train_prompt("tiny_bad", steps=1, gpus="8"))
    assert "8 GPU(s) requested but only 0 GPU(s) are visible" in message
    message = comfyui.run_expecting_error(train_prompt("tiny_bad", steps=1, prompt_embeddings="../../etc/passwd"))
    assert "inside ComfyUI's input folder" in message
    # the recipe's batch of 8 cannot be formed from 3 processes
    message = comfyui.run_expecting_error(train_prompt("tiny_bad", steps=1, gpus="cpu:3", gradient_accumulation=0))
    assert "input 'gradient_accumulation'" in message and "batch of 8" in message, message
    # a held-out reward with no validation prompts
    graph = train_prompt("tiny_bad", steps=1)
    graph["1"]["inputs"]["options"] = ["2", 0]
    graph["2"] = {"class_type": "WanRewardLoraTrainOptions", "inputs": {
        "validation_prompts": "", "validation_every": 2, "held_out_reward": "MPS_train_tiny.safetensors",
        "held_out_variant": "recipe", "held_out_reward_2": "none", "gaming_guard": "warn", "gaming_patience": 2,
        "sample_every": 0, "average_last_checkpoints": 0, "motion_weight": 0.0}}
    message = comfyui.run_expecting_error(graph)
    assert "input 'options: validation_prompts'" in message and "held_out_rewards" in message, message
    assert not any(n.startswith("tiny_bad") for n in comfyui.get("/models/loras").json())


def test_cancel_stops_every_process_and_resume_continues(tiny_models):
    comfyui = tiny_models
    name = "tiny_cancel"
    prompt_id = comfyui.queue(train_prompt(name, steps=200, checkpoint_every=2))
    deadline = time.monotonic() + 120
    while not [e for e in _events(comfyui, name) if e["event"] == "step" and e["step"] >= 2]:
        assert time.monotonic() < deadline, comfyui.log_tail()
        time.sleep(0.3)
    run_dir = str(comfyui.output / "wan_reward_lora" / name)
    assert _trainer_pids(run_dir), "no trainer process found while training"
    requests.post(f"{comfyui.url}/interrupt", json={}, timeout=10).raise_for_status()
    t0 = time.monotonic()
    while _trainer_pids(run_dir) and time.monotonic() - t0 < 10:
        time.sleep(0.2)
    assert not _trainer_pids(run_dir), f"trainer processes alive 10 s after Cancel: {_trainer_pids(run_dir)}"
    entry = comfyui.wait(prompt_id, timeout=60)
    assert entry["status"]["status_str"] == "error"
    assert any(kind == "execution_interrupted" for kind, _ in entry["status"]["messages"])
    events = _events(comfyui, name)
    stopped = [e for e in events if e["event"] == "finished"]
    assert stopped and stopped[-1]["reason"] == "stopped", "the trainer did not save on Cancel"
    last = stopped[-1]["step"]
    assert (comfyui.output / "wan_reward_lora" / name / "checkpoints" / "latest.json").exists()
    # queue again: it resumes from the checkpoint and finishes
    outputs = comfyui.run(train_prompt(name, steps=last + 2, checkpoint_every=2), timeout=300)
    started = [e for e in _events(comfyui, name) if e["event"] == "started"]
    assert len(started) == 2 and started[-1]["step"] == last and started[-1]["resumed_from"]
    assert json.loads(outputs["1"]["text"][0])["steps"] == last + 2


def test_a_file_that_is_not_a_reward_model_is_refused_before_anything_starts(tiny_models):
    comfyui = tiny_models
    page = comfyui.model_path("reward_models", "HPS_v2.1_compressed.pt")
    page.write_text("<!DOCTYPE html><html><body>Access denied</body></html>")
    message = comfyui.run_expecting_error(train_prompt("tiny_html", steps=1, reward_model="HPS_v2.1_compressed.pt"))
    assert "input 'reward_model'" in message and "HPS_v2.1_compressed.pt" in message, message
    assert "neither a safetensors file nor a PyTorch checkpoint" in message, message
    run_dir = comfyui.output / "wan_reward_lora" / "tiny_html"
    assert not (run_dir / "run.yaml").exists() and not (run_dir / "train.log").exists()  # nothing launched


def test_trainer_failure_is_a_node_error_with_log_tail(tiny_models):
    comfyui = tiny_models
    # keys that pass the header check but not the model's own load: the failure happens in the trainer
    broken = tiny_wan_state_dict(seed=1)
    del broken["blocks.0.ffn.0.weight"]
    save_safetensors(broken, comfyui.model_path("diffusion_models", "broken_high.safetensors"))
    message = comfyui.run_expecting_error(train_prompt("tiny_broken", steps=1, high_noise_model="broken_high.safetensors",
                                                       gpus="cpu"))
    assert "Reward LoRA training failed" in message and "broken_high.safetensors" in message, message
    assert "Last lines of the trainer log" in message
    assert not _trainer_pids(str(comfyui.output / "wan_reward_lora" / "tiny_broken"))


def test_second_run_into_the_same_folder_is_refused(tiny_models):
    from training.trainer.locks import run_lock

    comfyui = tiny_models
    runs = comfyui.output / "wan_reward_lora"
    with run_lock(runs, "tiny_locked", owner="another training in this test"):
        message = comfyui.run_expecting_error(train_prompt("tiny_locked", steps=1))
    assert "the run 'tiny_locked' is already training (another training in this test" in message, message
    assert not (runs / "tiny_locked").exists()


def test_prompts_encoded_with_comfyui_umt5_clip(tiny_models):
    """The CLIP path: ComfyUI's Wan umT5 classes (tiny config) encode the prompts in the node; the
    embeddings the trainer gets equal CLIPTextEncode's conditioning cut to the prompt's tokens."""
    from safetensors.torch import load_file

    from training.trainer.models import read_prompt_embeddings

    comfyui = tiny_models
    graph = train_prompt("tiny_clip", steps=1, prompt_embeddings="")
    graph["1"]["inputs"]["clip"] = ["2", 0]
    graph.update({
        "2": {"class_type": "ProbeTinyUMT5Clip", "inputs": {"seed": 0}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": PROMPTS[0], "clip": ["2", 0]}},
        "4": {"class_type": "ProbeSaveConditioning", "inputs": {"conditioning": ["3", 0], "filename": "clip_cond"}},
    })
    outputs = comfyui.run(graph, timeout=300)
    assert json.loads(outputs["1"]["text"][0])["reason"] == "completed"
    embeddings = read_prompt_embeddings(comfyui.output / "wan_reward_lora" / "tiny_clip" / "prompt_embeddings.safetensors")
    assert sorted(embeddings) == sorted(PROMPTS + [""])  # "" for the CFG negative (guidance 3)
    cond = load_file(outputs["4"]["text"][0])["cond"][0]  # [512, 4096], zero-padded by ComfyUI
    mine = embeddings[PROMPTS[0]]
    assert mine.shape[1] == 4096 and 2 <= mine.shape[0] < 512
    assert torch.allclose(mine, cond[: mine.shape[0]], atol=1e-5)
    assert float(cond[mine.shape[0]:].abs().max()) == 0.0  # nothing but padding was cut
    assert float(mine[-1].abs().max()) > 0  # the end token is kept


def test_existing_lora_of_another_origin_is_refused_before_training(tiny_models):
    from safetensors.torch import save_file

    comfyui = tiny_models
    taken = comfyui.model_path("loras", "tiny_taken.safetensors")
    save_file({"w": torch.zeros(2)}, str(taken), metadata={"ss_network_module": "networks.lora"})
    before = taken.read_bytes()
    message = comfyui.run_expecting_error(train_prompt("tiny_taken", steps=1))
    assert "tiny_taken.safetensors already exists and is a file this run did not write" in message, message
    assert "choose another output_name" in message
    assert taken.read_bytes() == before
    assert not _events(comfyui, "tiny_taken"), "the training started although its LoRA could not be published"


@pytest.mark.slow
def test_comfyui_killed_mid_run_then_restarted_resumes_and_says_so(tmp_path):
    """ComfyUI is SIGKILLed while it trains: its trainer saves and stops by itself; the restarted
    ComfyUI finds the run's lock stale, says at which checkpoint the run stopped, and resumes."""
    import signal

    from tests.helpers.comfyui_server import ComfyUIServer

    from training.trainer.locks import trainer_processes

    first = ComfyUIServer(comfyui_path(), tmp_path / "comfyui")
    first.start()
    try:
        write_tiny_models(first)
        name = "tiny_restart"
        first.queue(train_prompt(name, steps=500, checkpoint_every=2, gpus="cpu"))
        deadline = time.monotonic() + 180
        while not [e for e in _events(first, name) if e["event"] == "checkpoint"]:
            assert time.monotonic() < deadline, first.log_tail()
            time.sleep(0.3)
        run_dir = first.output / "wan_reward_lora" / name
        assert trainer_processes(run_dir)
        os.kill(first.process.pid, signal.SIGKILL)  # ComfyUI alone: the trainer is in a session of its own
        first.process.wait()
        deadline = time.monotonic() + 60
        while trainer_processes(run_dir):  # it notices its ComfyUI is gone, saves and exits
            assert time.monotonic() < deadline, "the trainer of a killed ComfyUI did not stop"
            time.sleep(0.2)
    finally:
        first.stop()
    stopped = [e for e in _events(first, name) if e["event"] == "finished"]
    assert stopped and stopped[-1]["reason"] == "stopped", "the orphaned trainer did not save before exiting"
    last = stopped[-1]["step"]

    second = ComfyUIServer(comfyui_path(), tmp_path / "comfyui")  # the same folders, a new process
    second.start()
    try:
        outputs = second.run(train_prompt(name, steps=last + 2, checkpoint_every=2, gpus="cpu"), timeout=300)
        log = second.log_path.read_text(errors="replace")
    finally:
        second.stop()
    assert (f"an earlier run of '{name}' was interrupted (ComfyUI node 1, output '{name}' pid {first.process.pid} "
            f"ended while it was training); its last checkpoint is step {last}") in log, log[-3000:]
    started = [e for e in _events(second, name) if e["event"] == "started"]
    assert started[-1]["step"] == last and started[-1]["resumed_from"].endswith(f"step-{last:06d}")
    assert json.loads(outputs["1"]["text"][0])["steps"] == last + 2


def _loader_report(comfyui, lora_high: str, lora_low: str) -> str:
    graph = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "tiny_train_high.safetensors", "weight_dtype": "default"}},
        "2": {"class_type": "UNETLoader", "inputs": {"unet_name": "tiny_train_low.safetensors", "weight_dtype": "default"}},
        "3": {"class_type": "WanRewardDualLoraLoader", "inputs": {
            "model_high": ["1", 0], "model_low": ["2", 0], "lora_high": lora_high, "strength_high": 1.0,
            "lora_low": lora_low, "strength_low": 1.0}},
        "4": {"class_type": "PreviewAny", "inputs": {"source": ["3", 2]}},
    }
    return comfyui.run(graph, timeout=300)["4"]["text"][0]


def test_options_node_validation_samples_and_best_lora(tiny_models):
    comfyui = tiny_models
    graph = train_prompt("tiny_opts", steps=4, learning_rate=1e-2, deepspeed="none", gpus="cpu")
    graph["1"]["inputs"]["options"] = ["2", 0]
    graph["2"] = {"class_type": "WanRewardLoraTrainOptions", "inputs": {
        "validation_prompts": "\n".join(VALIDATION_PROMPTS), "validation_every": 2, "held_out_reward": "none",
        "held_out_variant": "recipe", "held_out_reward_2": "none", "gaming_guard": "warn", "gaming_patience": 2,
        "sample_every": 2, "average_last_checkpoints": 0, "motion_weight": 0.0}}
    graph["3"] = {"class_type": "PreviewAny", "inputs": {"source": ["1", 3]}}  # best_lora_name
    graph["4"] = {"class_type": "PreviewAny", "inputs": {"source": ["1", 4]}}  # best_step
    with comfyui.listen("wan_reward.train") as events:
        outputs = comfyui.run(graph, timeout=600)
    names = [e["event"] for e in events.messages]
    assert "plan" in names and "validation" in names, names
    plan = next(e for e in events.messages if e["event"] == "plan")
    assert "recipe recommended" in plan["text"] and "effective batch 1" in plan["text"]
    assert "the recipe trains at" in plan["text"] or "trains at 8" in plan["text"]  # the batch warning
    samples = [e for e in events.messages if e["event"] == "sample"]
    assert [s["step"] for s in samples] == [2, 4] and samples[0]["images"], samples
    ref = samples[0]["images"][0]
    image = comfyui.get("/view", params=ref)
    assert image.headers["Content-Type"].startswith("image/") and image.content[:4] == b"\x89PNG"
    validations = [e for e in events.messages if e["event"] == "validation"]
    assert [v["step"] for v in validations] == [0, 2, 4]
    best_step = validations[-1]["best_step"]
    assert best_step in (2, 4), "the LoRA should beat the base model on its own reward after 4 steps at lr 1e-2"
    assert outputs["3"]["text"][0] == "tiny_opts_best.safetensors" and outputs["4"]["text"][0] == str(best_step)
    published = comfyui.get("/models/loras").json()
    assert "tiny_opts_best.safetensors" in published and "tiny_opts.safetensors" in published
    report = json.loads(outputs["1"]["text"][0])
    assert report["validation"]["step"] == 4 and "recipe recommended" in report["plan"]


def test_both_experts_publish_a_pair_the_loader_pairs_and_resume_continues_the_low_phase(tiny_models):
    from training.lora_pairing import partner_name

    comfyui = tiny_models
    graph = train_prompt("tiny_pair", steps=2, expert="both", deepspeed="none", gpus="cpu")
    graph["3"] = {"class_type": "PreviewAny", "inputs": {"source": ["1", 3]}}  # best_lora_name
    graph["4"] = {"class_type": "PreviewAny", "inputs": {"source": ["1", 4]}}  # best_step
    stopped = False
    with comfyui.listen("wan_reward.train") as events:
        prompt_id = comfyui.queue(graph)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and not stopped:  # Cancel once the low-noise phase has started
            if any(e["event"] == "started" and e.get("phase") == "low" for e in events.messages):
                requests.post(f"{comfyui.url}/interrupt", json={}, timeout=10)
                stopped = True
            time.sleep(0.2)
        comfyui.wait(prompt_id, timeout=300)
    assert stopped, [e["event"] for e in events.messages]
    high_dir = comfyui.output / "wan_reward_lora" / "tiny_pair" / "high_noise"
    assert (high_dir / "tiny_pair_high_noise.safetensors").is_file()
    # queued again: the finished high-noise phase is not run again, the low-noise phase continues
    with comfyui.listen("wan_reward.train") as events:
        outputs = comfyui.run(graph, timeout=600)
    started = [e.get("phase") for e in events.messages if e["event"] == "started"]
    assert started == ["low"], started
    assert sum(1 for e in _events(comfyui, "tiny_pair/high_noise") if e["event"] == "started") == 1
    published = comfyui.get("/models/loras").json()
    high, low = "tiny_pair_high_noise.safetensors", "tiny_pair_low_noise.safetensors"
    assert high in published and low in published
    assert partner_name(high, published) == low and partner_name(low, published) == high
    report = _loader_report(comfyui, high, low)
    assert report.count("keys unmatched: 0;") == 2 and "shape mismatches: 0" in report, report
    scores = json.loads(outputs["1"]["text"][0])
    assert scores["high"]["steps"] == 2 and scores["low"]["steps"] == 2
    # no validation: the "best" is the high-noise phase's last LoRA, and its step is that phase's
    assert outputs["3"]["text"][0] == high and outputs["4"]["text"][0] == "2"


@pytest.mark.parametrize("memory,gpus,deepspeed", [("low", "cpu", "zero3_offload"), ("sharded", "cpu:2", "zero3_offload")])
def test_memory_modes_train_from_the_node_and_publish(tiny_models, memory, gpus, deepspeed):
    comfyui = tiny_models
    name = f"tiny_memory_{memory}"
    outputs = comfyui.run(train_prompt(name, steps=1, memory=memory, gpus=gpus, deepspeed=deepspeed), timeout=600)
    started = next(e for e in _events(comfyui, name) if e["event"] == "started")
    assert started["memory_mode"] == memory
    if memory == "low":  # one process without DeepSpeed, whatever the preset said
        assert started["deepspeed"] is False and started["world_size"] == 1
    else:
        assert started["world_size"] == 2 and 0.4 < started["frozen_local_fraction"] < 0.6
    assert f"memory: {memory}" in json.loads(outputs["1"]["text"][0])["plan"]
    assert f"{name}.safetensors" in comfyui.get("/models/loras").json()
    run_yaml = (comfyui.output / "wan_reward_lora" / name / "run.yaml").read_text()
    assert f"memory: {memory}" in run_yaml


# ---- the trainer's LoRA in ComfyUI's own model (formerly test_trainer_comfyui.py) ----------------

# Runs in ComfyUI's Python: ComfyUI loads the expert and the LoRA its own way (as its
# UNETLoader / LoraLoaderModelOnly nodes do) and runs WanModel's forward on CPU.
COMFY_SIDE = textwrap.dedent("""
    import sys
    comfy_path, folder = sys.argv[1], sys.argv[2]
    sys.path.insert(0, comfy_path)
    sys.argv = [sys.argv[0], "--cpu"]
    import comfy.options
    comfy.options.enable_args_parsing()
    import torch
    import comfy.model_management, comfy.sd, comfy.utils
    from safetensors.torch import load_file, save_file
    inputs = load_file(folder + "/inputs.safetensors")
    patcher = comfy.sd.load_diffusion_model_state_dict(comfy.utils.load_torch_file(folder + "/expert.safetensors"),
                                                       model_options={"dtype": torch.float32})
    def run(p):
        comfy.model_management.load_models_gpu([p], force_full_load=True)
        with torch.no_grad():
            return p.model.diffusion_model(inputs["x"], inputs["t"], inputs["ctx"]).float().contiguous()
    base = run(patcher)
    patched, _ = comfy.sd.load_lora_for_models(patcher, None, comfy.utils.load_torch_file(folder + "/lora.safetensors"), 1.0, 0)
    save_file({"base": base, "lora": run(patched)}, folder + "/outputs.safetensors")
""")


@pytest.mark.comfyui
def test_lora_changes_comfyui_model_exactly_as_trainer_model(tmp_path):
    comfy = comfyui_path()
    python = comfy / ".venv" / "bin" / "python"
    if not python.exists():
        pytest.skip(f"no ComfyUI venv at {python}")
    save_safetensors(tiny_wan_state_dict(seed=0), tmp_path / "expert.safetensors")
    trainer_model = load_wan_expert(tmp_path / "expert.safetensors", torch.float32)
    base_model = load_wan_expert(tmp_path / "expert.safetensors", torch.float32)
    add_lora(trainer_model, rank=4, alpha=2.0, targets="all_linear", exclude=["ffn"])
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in lora_parameters(trainer_model).values():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
    save_canonical_lora(tmp_path / "lora.safetensors", native_modules(lora_state(trainer_model), 2.0), {})
    x = torch.randn(1, 36, 2, 4, 4, generator=gen)
    t = torch.tensor([700.0])
    ctx = torch.randn(1, 16, 4096, generator=gen)
    save_file({"x": x, "t": t, "ctx": ctx}, tmp_path / "inputs.safetensors")
    with torch.no_grad():
        ours = trainer_model(x, t, ctx, return_dict=False)[0] - base_model(x, t, ctx, return_dict=False)[0]
    (tmp_path / "comfy_side.py").write_text(COMFY_SIDE)
    proc = subprocess.run([str(python), str(tmp_path / "comfy_side.py"), str(comfy), str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = load_file(tmp_path / "outputs.safetensors")
    theirs = out["lora"] - out["base"]
    assert ours.abs().max() > 0.05  # the LoRA changes the output noticeably
    assert torch.allclose(theirs, ours, atol=1e-4), float((theirs - ours).abs().max())
