"""The official MPS file format (a whole pickled module) is read without executing its code."""

from __future__ import annotations

import os
import sys
import types

import torch
from torch import nn

from training.rewards import load_reward_model
from tools.convert_mps import main as convert_main
from training.rewards.pickled_module import read_pickled_module
from training.rewards.mps import MPSNetwork
from training.rewards.tiny import TINY_MPS_CLIP_CONFIG, TINY_MPS_CROSS_CONFIG, tiny_mps_state_dict
from training.safe_io import save_safetensors

FAKE_MODULES = ("trainer", "trainer.models", "trainer.models.clip_model")


class _Marker:
    """Pickles as a call that would create a file if the loader executed pickled code."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def _write_whole_module(path, marker=None):
    """Pickle a module tree the way MPS saved it: ``trainer.models.clip_model.CLIPModel`` (fp16)."""
    fake = types.ModuleType("trainer.models.clip_model")
    for name in FAKE_MODULES:
        sys.modules[name] = fake if name.endswith("clip_model") else types.ModuleType(name)

    class CLIPModel(nn.Module):
        def __init__(self, network):
            super().__init__()
            self.model, self.cross_model = network.model, network.cross_model
            self.payload = marker

    CLIPModel.__module__ = "trainer.models.clip_model"
    CLIPModel.__qualname__ = "CLIPModel"
    fake.CLIPModel = CLIPModel
    try:
        network = MPSNetwork(TINY_MPS_CLIP_CONFIG, TINY_MPS_CROSS_CONFIG)
        network.load_state_dict(tiny_mps_state_dict(seed=2), strict=False)
        whole = CLIPModel(network).half()
        torch.save(whole, path)
        return {k: v for k, v in whole.state_dict().items() if not k.endswith("position_ids")}
    finally:
        for name in FAKE_MODULES:
            sys.modules.pop(name, None)


def test_whole_module_pickle_is_read_without_its_classes(tmp_path):
    expected = _write_whole_module(tmp_path / "MPS_overall_checkpoint.pth")
    assert "trainer" not in sys.modules
    state_dict, facts = read_pickled_module(tmp_path / "MPS_overall_checkpoint.pth")
    state_dict = {k: v for k, v in state_dict.items() if not k.endswith("position_ids")}
    assert set(state_dict) == set(expected)
    assert all(torch.equal(state_dict[k], expected[k]) for k in expected)
    assert facts["root_class"] == "trainer.models.clip_model.CLIPModel" and facts["inv_freq_dtype"] == "torch.float16"
    assert "trainer" not in sys.modules  # nothing was imported


def test_official_file_loads_and_scores_like_its_conversion(tmp_path):
    expected = _write_whole_module(tmp_path / "MPS_overall_checkpoint.pth")
    save_safetensors(expected, tmp_path / "converted.safetensors")
    assert convert_main([str(tmp_path / "MPS_overall_checkpoint.pth"), str(tmp_path / "cli.safetensors")]) == 0
    frames = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    scores = [load_reward_model(tmp_path / name).score(frames, ["a cat"])
              for name in ("MPS_overall_checkpoint.pth", "converted.safetensors", "cli.safetensors")]
    assert torch.equal(scores[0], scores[1]) and torch.equal(scores[0], scores[2])


def test_pickled_code_inside_a_module_is_not_executed(tmp_path):
    marker = tmp_path / "executed"
    _write_whole_module(tmp_path / "evil.pth", marker=_Marker(str(marker)))
    model = load_reward_model(tmp_path / "evil.pth")  # the payload is an inert stub
    assert model.name == "mps"
    assert not marker.exists()
