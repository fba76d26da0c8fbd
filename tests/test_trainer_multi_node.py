"""Several machines: two `accelerate launch` invocations act as two machines (--num_machines 2,
--machine_rank 0 and 1, the main process on 127.0.0.1, CPU / gloo) with the shipped multi-node
preset (ZeRO-3 + CPU offload). They train one run together, write the LoRA and the checkpoint
metadata once (the main process), and both resume from the checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from training.demo import write_tiny_run
from training.lora_format import read_lora
from training.trainer.launcher import free_port
from training.trainer.progress import parse_events

PACK = Path(__file__).resolve().parents[1]
ENTRY = PACK / "training" / "train_reward_lora.py"
ACCELERATE = Path(sys.executable).with_name("accelerate")
PRESET = "training/configs/accelerate_multi_node_zero3_offload.yaml"

pytestmark = pytest.mark.slow


def launch_two_machines(config: Path, port: int) -> list[subprocess.CompletedProcess]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([str(ACCELERATE), "launch", "--config_file", PRESET, "--num_machines", "2",
                               "--num_processes", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
                               "--main_process_port", str(port), str(ENTRY), "--config", str(config)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=PACK)
             for rank in (0, 1)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=400)
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return results


def test_two_machines_train_one_run_and_resume(tmp_path):
    if not ACCELERATE.exists():
        pytest.skip("accelerate launcher not installed beside this Python")
    data = yaml.safe_load(write_tiny_run(tmp_path).read_text())
    data.update(max_steps=2, checkpoint_every=1, validation_every=0, held_out_rewards=[], resume=True,
                output_dir=str(tmp_path / "run"))
    config = tmp_path / "two_machines.yaml"
    config.write_text(yaml.safe_dump(data))

    main, other = launch_two_machines(config, free_port())
    assert main.returncode == 0 and other.returncode == 0, (main.stderr[-2000:], other.stderr[-2000:])
    events = parse_events(main.stdout)
    started = events[0]
    assert started["world_size"] == 2 and started["zero_stage"] == 3 and started["offload_param_device"] == "cpu"
    assert [e["step"] for e in events if e["event"] == "step"] == [1, 2]
    assert parse_events(other.stdout) == []  # machine 1's process is not the main one: it reports nothing
    metrics = parse_events((tmp_path / "run" / "metrics.jsonl").read_text())
    assert [e["event"] for e in metrics].count("started") == 1  # written once, by the main process
    step2 = tmp_path / "run" / "checkpoints" / "step-000002"
    assert sorted(p.name for p in step2.glob("trainer-rank*.pt")) == ["trainer-rank0.pt", "trainer-rank1.pt"]
    assert len(list((step2 / "ds" / "state").glob("zero_pp_rank_*_model_states.pt"))) == 2  # one partition each
    assert json.loads((tmp_path / "run" / "checkpoints" / "latest.json").read_text())["step"] == 2
    assert read_lora(tmp_path / "run" / "tiny_reward_lora.safetensors").metadata["steps"] == "2"

    # both machines again, two more steps: they resume from the checkpoint
    data["max_steps"] = 4
    config.write_text(yaml.safe_dump(data))
    main, other = launch_two_machines(config, free_port())
    assert main.returncode == 0 and other.returncode == 0, (main.stderr[-2000:], other.stderr[-2000:])
    events = parse_events(main.stdout)
    assert events[0]["step"] == 2 and events[0]["resumed_from"].endswith("step-000002")
    assert [e["step"] for e in events if e["event"] == "step"] == [3, 4]
    assert read_lora(tmp_path / "run" / "tiny_reward_lora.safetensors").metadata["steps"] == "4"
