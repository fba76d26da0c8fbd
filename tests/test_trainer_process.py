"""The trainer as a subprocess: 2-process ZeRO-3 CPU offload through `accelerate launch`
(stopped by the STOP file, relaunched: resumes and finishes), SIGKILL + restart resumes
exactly, SIGTERM and the STOP file save and exit cleanly."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from training.demo import write_tiny_run
from training.lora_format import read_lora
from training.lora_match import match_lora
from training.trainer.progress import EXIT_OK, SAMPLE_NOW_FILE, SAVE_NOW_FILE, STOP_FILE, parse_events

PACK = Path(__file__).resolve().parents[1]
ENTRY = PACK / "training" / "train_reward_lora.py"
ACCELERATE = Path(sys.executable).with_name("accelerate")


def _env() -> dict:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"  # tiny models; threads stall on a busy 2-core machine
    env.pop("RANK", None)
    return env


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("proc")
    write_tiny_run(folder)  # model files once; each test writes its own config
    return folder


def _config(folder: Path, name: str, **overrides) -> Path:
    base = yaml.safe_load((folder / "run.yaml").read_text())
    base.update(dict(validation_every=0, output_dir=str(folder / name)), **overrides)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(base))
    return path


def _run(cmd: list[str], timeout: float = 240) -> tuple[int, list[dict], str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env(), cwd=PACK)
    return proc.returncode, parse_events(proc.stdout), proc.stderr


def _lora_tensors(path: Path) -> dict[str, torch.Tensor]:
    lora = read_lora(path)
    return {k: v.float() for k, v in lora.tensors.items()}


def test_two_process_zero3_offload_run_stops_resumes_and_writes_a_lora(tiny):
    if not ACCELERATE.exists():
        pytest.skip("accelerate launcher not installed beside this Python")
    shutil.rmtree(tiny / "zero3", ignore_errors=True)
    # validation at 0 and 4: prompts split over the ranks, "best" decided on rank 0 and broadcast
    config = _config(tiny, "zero3", max_steps=4, checkpoint_every=2, max_grad_norm=0.25, validation_every=4)
    launch = [str(ACCELERATE), "launch", "--config_file", "training/configs/accelerate_cpu_zero3_offload_2proc.yaml",
              str(ENTRY), "--config", str(config)]
    # first launch: a STOP request after step 1 saves a checkpoint (a collective) and exits
    proc = subprocess.Popen(launch, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=_env(),
                            cwd=PACK)
    events = []
    for line in proc.stdout:
        events += parse_events(line)
        if events and events[-1]["event"] == "step" and events[-1]["step"] == 1:
            (tiny / "zero3" / STOP_FILE).touch()
    proc.wait(timeout=120)
    assert proc.returncode == 0
    started = events[0]
    assert started["event"] == "started" and started["world_size"] == 2 and started["deepspeed"]
    # ZeRO-3 with parameters and optimizer offloaded to the CPU, LoRA really partitioned
    assert (started["zero_stage"], started["offload_param_device"], started["offload_optimizer_device"]) == (3, "cpu", "cpu")
    assert started["lora_params_partitioned"] is True
    assert started["gradient_clipping"] == 0.25  # the engine applies max_grad_norm
    stop = [e for e in events if e["event"] == "checkpoint"][-1]
    assert stop["reason"] == "stop" and 1 <= stop["step"] < 4
    assert events[-1]["event"] == "finished" and events[-1]["reason"] == "stopped"
    assert [(v["step"], sorted(v["rewards"]), sorted(v["held_out"])) for v in events
            if v["event"] == "validation"] == [(0, ["hps"], ["mps"])]
    ckpt = Path(stop["path"])
    assert (ckpt / "ds").is_dir() and (ckpt / "trainer-rank1.pt").is_file()

    # relaunch: resumes from that checkpoint under DeepSpeed and finishes
    code, events, stderr = _run(launch)
    assert code == 0, stderr[-3000:]
    started = events[0]
    assert started["step"] == stop["step"] and started["resumed_from"] == str(ckpt)
    steps = [e for e in events if e["event"] == "step"]
    assert [e["step"] for e in steps] == list(range(stop["step"] + 1, 5))  # one stream: the main process's
    assert events[-1]["event"] == "finished" and events[-1]["reason"] == "completed"
    validation = [e for e in events if e["event"] == "validation"]
    assert [v["step"] for v in validation] == [4] and validation[0]["best_step"] in (0, 4)
    if validation[0]["best"]:  # written by all ranks together (a ZeRO-3 gather)
        assert read_lora(Path(validation[0]["best_lora_path"])).metadata["steps"] == "4"
    lora_path = Path(events[-1]["lora_path"])
    assert read_lora(lora_path).metadata["steps"] == "4"
    from safetensors.torch import load_file

    from training.trainer.models import strip_prefix

    report = match_lora(read_lora(lora_path), strip_prefix(load_file(tiny / "models" / "wan2.2_tiny_low_noise.safetensors")))
    assert len(report.matched) == 22 and not report.unmatched
    assert any(float(t.abs().max()) > 0 for k, t in _lora_tensors(lora_path).items() if "lora_up" in k)


def test_sigkill_then_restart_resumes_exactly(tiny):
    steps = 6
    reference = _config(tiny, "straight", max_steps=steps, checkpoint_every=2)
    code, _, stderr = _run([sys.executable, str(ENTRY), "--config", str(reference)])
    assert code == 0, stderr[-2000:]

    killed = _config(tiny, "killed", max_steps=steps, checkpoint_every=2)
    proc = subprocess.Popen([sys.executable, str(ENTRY), "--config", str(killed)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=_env(), cwd=PACK)
    seen = []
    for line in proc.stdout:
        seen += parse_events(line)
        if seen and seen[-1]["event"] == "step" and seen[-1]["step"] == 3:
            proc.send_signal(signal.SIGKILL)  # after the checkpoint at step 2, mid-way to 4
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert any(e["event"] == "checkpoint" and e["step"] == 2 for e in seen)

    code, events, stderr = _run([sys.executable, str(ENTRY), "--config", str(killed)])
    assert code == 0, stderr[-2000:]
    started = events[0]
    assert started["step"] == 2 and started["resumed_from"].endswith("step-000002")
    assert [e["step"] for e in events if e["event"] == "step"] == [3, 4, 5, 6]
    a = _lora_tensors(tiny / "straight" / "tiny_reward_lora.safetensors")
    b = _lora_tensors(tiny / "killed" / "tiny_reward_lora.safetensors")
    assert a.keys() == b.keys()
    for key in a:  # optimizer, scheduler, RNG and data order restored: the same LoRA
        assert torch.allclose(a[key], b[key], atol=1e-6), key


@pytest.mark.parametrize("how", ["sigterm", "stop_file"])
def test_stop_request_saves_then_exits(tiny, how):
    name = f"stop_{how}"
    shutil.rmtree(tiny / name, ignore_errors=True)
    config = _config(tiny, name, max_steps=100000, checkpoint_every=0)
    proc = subprocess.Popen([sys.executable, str(ENTRY), "--config", str(config)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=_env(), cwd=PACK)
    events = []
    requested = False
    deadline = time.time() + 180
    for line in proc.stdout:
        events += parse_events(line)
        last = events[-1] if events else {}
        if not requested and last.get("event") == "step" and last["step"] >= 2:
            if how == "sigterm":
                proc.send_signal(signal.SIGTERM)
            else:  # save and sample first, then stop
                (tiny / name / SAVE_NOW_FILE).touch()
                (tiny / name / SAMPLE_NOW_FILE).touch()
            requested = True
        if how == "stop_file" and last.get("event") == "checkpoint" and last["reason"] == "save_now":
            (tiny / name / STOP_FILE).touch()
        assert time.time() < deadline
    proc.wait(timeout=60)
    assert proc.returncode == EXIT_OK
    checkpoint = [e for e in events if e["event"] == "checkpoint"]
    assert [c["reason"] for c in checkpoint] == (["stop"] if how == "sigterm" else ["save_now", "stop"])
    if how == "stop_file":
        samples = [e for e in events if e["event"] == "sample"]
        assert len(samples) == 1 and Path(samples[0]["paths"][0]).is_file()
    last_step = [e["step"] for e in events if e["event"] == "step"][-1]
    assert checkpoint[-1]["step"] == last_step < 100000
    assert events[-1]["event"] == "finished" and events[-1]["reason"] == "stopped"
    assert read_lora(Path(events[-1]["lora_path"])).metadata["steps"] == str(last_step)
    latest = json.loads((tiny / name / "checkpoints" / "latest.json").read_text())
    assert latest["step"] == last_step
    for flag in (STOP_FILE, SAVE_NOW_FILE, SAMPLE_NOW_FILE):
        assert not (tiny / name / flag).exists()
