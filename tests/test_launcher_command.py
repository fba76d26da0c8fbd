"""training/trainer/launcher.py: the trainer's command (accelerate launch, presets) and environment."""

from __future__ import annotations

import pytest
import yaml

from training.trainer import launcher
from training.trainer.devices import DeviceChoice
from training.trainer.failures import LaunchError
from training.trainer.launcher import build_command, build_env


def test_command_and_env(tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    cfg = tmp_path / "run.yaml"
    cmd = build_command(cfg, DeviceChoice(2), preset="none", python="/py", port=29123)
    assert cmd[:3] == ["/py", "-m", "accelerate.commands.launch"]
    assert cmd[cmd.index("--num_processes") + 1] == "2"
    assert "--multi_gpu" in cmd and cmd[cmd.index("--main_process_port") + 1] == "29123"
    assert cmd[-3:] == [str(launcher.ENTRY_SCRIPT), "--config", str(cfg)]
    assert launcher.ENTRY_SCRIPT.is_file()
    single = build_command(cfg, DeviceChoice(1, ("3",)), preset="none", python="/py")
    assert "--multi_gpu" not in single and "--main_process_port" not in single
    with pytest.raises(LaunchError, match="unknown"):
        build_command(cfg, DeviceChoice(1), preset="zero9")
    for preset, (gpu_file, cpu_file) in launcher.PRESETS.items():
        for devices, name in ((DeviceChoice(2, ("0", "1")), gpu_file), (DeviceChoice(2), cpu_file)):
            if preset == "none":
                continue
            if name is None:
                with pytest.raises(LaunchError, match="needs GPUs"):
                    build_command(cfg, devices, preset=preset)
                continue
            ds = build_command(cfg, devices, preset=preset, python="/py")
            preset_file = launcher.CONFIGS_DIR / name
            assert preset_file.is_file(), preset_file
            assert ds[ds.index("--config_file") + 1] == str(preset_file) and "--multi_gpu" not in ds
            assert ds[ds.index("--num_processes") + 1] == "2"
            # the preset names its DeepSpeed JSON relative to the pack root, where the run starts
            ds_json = yaml.safe_load(preset_file.read_text())["deepspeed_config"]["deepspeed_config_file"]
            assert (launcher.PACK_ROOT / ds_json).is_file()
    env = build_env(DeviceChoice(2, ("1", "3")), base={"RANK": "3", "PATH": "/bin"}, threads=1)
    assert env["CUDA_VISIBLE_DEVICES"] == "1,3" and "RANK" not in env and env["OMP_NUM_THREADS"] == "1"
    assert build_env(DeviceChoice(2), base={})["CUDA_VISIBLE_DEVICES"] == ""


def test_cpu_runs_get_one_thread_per_process_unless_the_caller_set_it(monkeypatch):
    """Several threads per process on shared cores made a tiny CPU run ten times slower."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    for devices in (DeviceChoice(1), DeviceChoice(2)):  # "cpu", "cpu:2"
        env = build_env(devices)
        assert env["OMP_NUM_THREADS"] == "1" and env["MKL_NUM_THREADS"] == "1"
        assert build_env(devices, base={"PATH": "/bin"})["OMP_NUM_THREADS"] == "1"
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's value is kept
    env = build_env(DeviceChoice(2))
    assert env["OMP_NUM_THREADS"] == "3" and "MKL_NUM_THREADS" not in env
    env = build_env(DeviceChoice(1), base={"OMP_NUM_THREADS": "4", "MKL_NUM_THREADS": "2"})
    assert env["OMP_NUM_THREADS"] == "4" and env["MKL_NUM_THREADS"] == "2"
    env = build_env(DeviceChoice(1), base={"MKL_NUM_THREADS": "2"})
    assert env["OMP_NUM_THREADS"] == "1" and env["MKL_NUM_THREADS"] == "2"
    gpu = build_env(DeviceChoice(1, ("0",)), base={})  # GPU runs keep torch's own default
    assert "OMP_NUM_THREADS" not in gpu and "MKL_NUM_THREADS" not in gpu
    assert build_env(DeviceChoice(1), base={"OMP_NUM_THREADS": "4"}, threads=2)["OMP_NUM_THREADS"] == "2"
