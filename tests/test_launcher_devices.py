"""training/trainer/devices.py: the gpus text and the mapping of ComfyUI's GPU ids to physical ones."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from training.trainer.devices import DeviceChoice, parse_devices
from training.trainer.failures import LaunchError
from training.trainer.launcher import build_env
from training.trainer.locks import FileLock


def test_parse_devices(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert parse_devices("auto", 0) == DeviceChoice(1)
    assert parse_devices("", 4) == DeviceChoice(4, ("0", "1", "2", "3"))
    assert parse_devices("2", 4) == DeviceChoice(2, ("0", "1"))
    assert parse_devices("1,3", 4) == DeviceChoice(2, ("1", "3"))
    assert parse_devices("cpu:2", 8) == DeviceChoice(2) and DeviceChoice(2).lock_keys == []
    assert parse_devices("1,3", 4).lock_keys == ["gpu1", "gpu3"]
    assert parse_devices("cpu", 8) == DeviceChoice(1)
    with pytest.raises(LaunchError, match="4 GPU\\(s\\) requested but only 2 GPU\\(s\\) are visible"):
        parse_devices("4", 2)
    with pytest.raises(LaunchError, match="GPU id\\(s\\) 5 not visible"):
        parse_devices("0,5", 2)
    for bad in ("two", "0,0", "cpu:x", "0"):
        with pytest.raises(LaunchError):
            parse_devices(bad, 2)


def test_gpu_ids_mapped_through_the_callers_visible_devices(monkeypatch):
    """ComfyUI started with CUDA_VISIBLE_DEVICES=2,3 counts them as 0,1: the trainer must get 2,3."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    choice = parse_devices("1,", 2)  # GPU id 1 (a bare "1" is a count)
    assert build_env(choice)["CUDA_VISIBLE_DEVICES"] == "3"
    assert build_env(parse_devices("1", 2))["CUDA_VISIBLE_DEVICES"] == "2"
    assert build_env(parse_devices("auto", 2))["CUDA_VISIBLE_DEVICES"] == "2,3"
    assert choice.lock_keys == ["gpu3"] and choice.lock_names() == {"gpu3": "GPU 3 (ComfyUI's GPU 1)"}
    assert build_env(DeviceChoice(1), base={"CUDA_VISIBLE_DEVICES": "2,3"})["CUDA_VISIBLE_DEVICES"] == ""
    uuids = "GPU-aaaa-1111,GPU-bbbb-2222"
    assert build_env(parse_devices("1,", 2), base={"CUDA_VISIBLE_DEVICES": uuids})["CUDA_VISIBLE_DEVICES"] \
        == "GPU-bbbb-2222"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", uuids)
    assert parse_devices("0,", 2).lock_keys == ["gpuGPU-aaaa-1111"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2")
    with pytest.raises(LaunchError, match="CUDA_VISIBLE_DEVICES='2' lists 1 GPU"):
        build_env(DeviceChoice(1, ("1",)))
    # the lock is per physical GPU: ComfyUI's 0 under "3" and ComfyUI's 1 under "2,3" collide
    folder = Path(tempfile.mkdtemp())
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    first = FileLock(parse_devices("0,", 1).lock_keys, folder=folder).acquire()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    second = parse_devices("1,", 2)
    with pytest.raises(LaunchError, match="GPU 3 \\(ComfyUI's GPU 1\\) is already training"):
        FileLock(second.lock_keys, folder=folder, names=second.lock_names()).acquire()
    first.release()
