"""training/trainer/publish.py: publishing the LoRA only over a file this run wrote."""

from __future__ import annotations

import pytest

from training.trainer import publish
from training.trainer.failures import LaunchError
from training.trainer.progress import TRAINER_TAG


def test_publish_refuses_a_lora_this_run_did_not_write(tmp_path):
    from safetensors.torch import load_file, save_file
    import torch

    from training.trainer.publish import publish_lora

    run = tmp_path / "run"
    run.mkdir()
    loras = tmp_path / "loras"
    loras.mkdir()
    ours = {"trainer": TRAINER_TAG, "config_hash": "aaaa"}
    save_file({"w": torch.ones(2)}, run / "x.safetensors", metadata=ours)
    target = loras / "x.safetensors"
    publish_lora(run / "x.safetensors", target, run)  # new file: fine
    assert load_file(target)["w"].tolist() == [1.0, 1.0]
    # the resumed run (config hash changed by a harmless field) replaces its own earlier LoRA
    save_file({"w": torch.full((2,), 2.0)}, run / "x.safetensors", metadata={**ours, "config_hash": "bbbb"})
    publish_lora(run / "x.safetensors", target, run)
    assert load_file(target)["w"].tolist() == [2.0, 2.0]
    # someone's own LoRA of that name, another run's, a non-safetensors file: refused, kept
    for meta, who in (({"ss_network_module": "networks.lora"}, "a file this run did not write"),
                      ({"trainer": TRAINER_TAG, "config_hash": "cccc"}, "another reward LoRA run"),
                      (None, "a file this run did not write")):
        other = loras / "other.safetensors"
        if meta is None:
            other.write_bytes(b"not a safetensors file")
        else:
            save_file({"w": torch.zeros(2)}, other, metadata=meta)
        before = other.read_bytes()
        with pytest.raises(LaunchError, match=f"other.safetensors already exists and is {who}; choose another "
                                              "output_name, or delete or rename that file"):
            publish_lora(run / "x.safetensors", other, run)
        with pytest.raises(LaunchError, match="already exists"):
            publish.check_publish_target(other, run, "bbbb")  # the node's check before training
        assert other.read_bytes() == before
    publish.check_publish_target(loras / "absent.safetensors", run, None)
