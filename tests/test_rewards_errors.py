"""Bad input to the reward models gets a clear error naming the value."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from training.rewards import load_reward_model, motion_score
from training.rewards.tiny import tiny_hps_state_dict, tiny_mps_state_dict, write_tiny_hps_checkpoint
from training.safe_io import UserFileError, save_safetensors, torch_save


@pytest.fixture(scope="module")
def hps(tmp_path_factory):
    path = tmp_path_factory.mktemp("hps") / "HPS_v2.1_compressed.pt"
    write_tiny_hps_checkpoint(path)
    return load_reward_model(path)


def test_missing_checkpoint_says_where_and_what(tmp_path):
    with pytest.raises(UserFileError) as info:
        load_reward_model(tmp_path / "nope.pt")
    message = str(info.value)
    assert "nope.pt" in message and "reward_models" in message
    assert "HPS_v2.1_compressed.pt" in message and "xswu/HPSv2" in message and "MPS" in message


@pytest.mark.parametrize("name", ["hps.SFT", "hps.Safetensors", "hps.sft"])
def test_safetensors_suffixes_in_any_case(tmp_path, name):
    write_tiny_hps_checkpoint(tmp_path / "hps.safetensors")
    renamed = tmp_path / name
    (tmp_path / "hps.safetensors").rename(renamed)
    assert load_reward_model(renamed).name == "hps_v2.1"


def test_neither_hps_nor_mps_names_what_it_found(tmp_path):
    path = save_safetensors({"blocks.0.self_attn.q.weight": torch.zeros(4, 4)}, tmp_path / "wan.safetensors")
    with pytest.raises(UserFileError, match=r"not an HPS v2.1 .* nor an MPS.*blocks\.0\.self_attn\.q\.weight"):
        load_reward_model(path)


def test_hf_clip_without_cross_model_is_pickscore(tmp_path):
    """A whole transformers CLIPModel is PickScore's layout (MPS has its cross model besides)."""
    state = {k[len("model."):]: v for k, v in tiny_mps_state_dict().items() if k.startswith("model.")}
    path = save_safetensors(state, tmp_path / "clip.safetensors")
    assert load_reward_model(path).name == "pickscore"


def test_part_of_an_hf_clip_is_explained_and_the_file_named(tmp_path):
    state = {k[len("model."):]: v for k, v in tiny_mps_state_dict().items() if k.startswith("model.vision_model.")}
    path = save_safetensors(state, tmp_path / "clip_vision.safetensors")
    with pytest.raises(UserFileError, match=r"^clip_vision\.safetensors: not an HPS.*part of a transformers CLIP model"):
        load_reward_model(path)


def test_missing_key_is_named(tmp_path):
    state = tiny_hps_state_dict()
    del state["visual.ln_post.weight"]
    path = save_safetensors(state, tmp_path / "hps.safetensors")
    with pytest.raises(UserFileError, match=r"^hps\.safetensors: the checkpoint does not match.*1 missing keys .*visual\.ln_post\.weight"):
        load_reward_model(path)


def test_unexpected_key_is_named(tmp_path):
    state = tiny_mps_state_dict()
    state["cross_model.extra.weight"] = torch.zeros(2)
    path = save_safetensors(state, tmp_path / "mps.safetensors")
    with pytest.raises(UserFileError, match=r"1 unexpected keys .*cross_model\.extra\.weight"):
        load_reward_model(path)


def test_inconsistent_shapes_are_reported(tmp_path):
    state = tiny_hps_state_dict()
    state["visual.proj"] = torch.zeros(3, 3)
    path = save_safetensors(state, tmp_path / "hps.safetensors")
    with pytest.raises(UserFileError, match="HPS key names but inconsistent shapes"):
        load_reward_model(path)


def test_pickled_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    with open(path, "wb") as handle:
        pickle.dump({"state_dict": Evil()}, handle)
    with pytest.raises(UserFileError, match=r"evil.pt is a pickle that needs code execution to load \(Unsupported .*\).* never runs pickled code") as info:
        load_reward_model(path)
    _only_one_message(str(info.value))


def _only_one_message(message: str) -> None:
    assert "not a pickled module" not in message or "needs code execution" in message
    assert message.count("download it again") + message.count("never runs pickled code") == 1, message


@pytest.mark.parametrize("name", ["hps.pt", "hps.safetensors"])
def test_truncated_checkpoint_is_called_corrupt_once(tmp_path, name):
    path = write_tiny_hps_checkpoint(tmp_path / name)
    data = open(path, "rb").read()
    with open(path, "wb") as handle:
        handle.write(data[: len(data) // 2])
    with pytest.raises(UserFileError, match=r"hps\.\w+ is a corrupt or truncated") as info:
        load_reward_model(path)
    _only_one_message(str(info.value))
    assert "pickle" not in str(info.value)


def test_corrupt_legacy_pickle_is_called_corrupt(tmp_path):
    path = tmp_path / "legacy.pth"
    torch.save(tiny_hps_state_dict(), path, _use_new_zipfile_serialization=False)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(UserFileError, match="legacy.pth is a corrupt or truncated PyTorch checkpoint") as info:
        load_reward_model(path)
    _only_one_message(str(info.value))


def test_format_is_read_from_the_content_not_the_suffix(tmp_path):
    path = write_tiny_hps_checkpoint(tmp_path / "hps.safetensors")
    moved = Path(path).rename(tmp_path / "hps.pt")
    assert load_reward_model(moved).name == "hps_v2.1"


@pytest.mark.parametrize("content,match", [(b"", r"empty \(0 bytes\)"),
                                           (b"<html>404 Not Found</html>", r"neither a safetensors file nor a "
                                                                         r"PyTorch checkpoint \(it starts with b'<html>")])
def test_wrong_kind_of_file(tmp_path, content, match):
    path = tmp_path / "HPS_v2.1_compressed.pt"
    path.write_bytes(content)
    with pytest.raises(UserFileError, match=match):
        load_reward_model(path)


def test_non_tensor_entries_are_refused(tmp_path):
    path = torch_save({"state_dict": {"a": torch.zeros(1), "b": "text"}}, tmp_path / "x.pt")
    with pytest.raises(UserFileError, match=r"not a plain state dict: entries \['b'\]"):
        load_reward_model(path)


def test_variant_applies_to_mps_only(tmp_path):
    path = write_tiny_hps_checkpoint(tmp_path / "hps.pt")
    with pytest.raises(ValueError, match="variant 'videox_fun' applies to MPS only"):
        load_reward_model(path, variant="videox_fun")
    # A UI passing its MPS choice for every file: ignored for HPS, the model is the plain HPS one.
    model = load_reward_model(path, variant="videox_fun", mps_variant_only=True)
    assert model.name == "hps_v2.1" and not hasattr(model, "variant")


@pytest.mark.parametrize("prompt", ["", "   "])
def test_empty_prompt(hps, prompt):
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        hps.score(torch.rand(1, 3, 64, 64), [prompt])


def test_prompt_count_mismatch(hps):
    with pytest.raises(ValueError, match="got 2 prompts for 3 frames"):
        hps.score(torch.rand(3, 3, 64, 64), ["a", "b"])


def test_zero_frames(hps):
    with pytest.raises(ValueError, match=r"empty \(0 frames\)"):
        hps.score(torch.rand(0, 3, 64, 64), [])
    with pytest.raises(ValueError, match=r"empty \(0 frames\)"):
        motion_score(torch.rand(0, 3, 8, 8))


@pytest.mark.parametrize("shape", [(2, 64, 64, 3), (3, 64, 64), (1, 2, 64, 64), (1, 5, 64, 64)])
def test_wrong_shape(hps, shape):
    with pytest.raises(ValueError, match=r"shape \[B, 3, H, W\].*" + str(tuple(shape)).replace("(", r"\(").replace(")", r"\)")):
        hps.score(torch.rand(shape), ["a cat"])


def test_wrong_range_and_dtype(hps):
    with pytest.raises(ValueError, match=r"\[0, 1\], got values in \[-1"):
        hps.score(torch.rand(1, 3, 32, 32) * 2 - 1.5, ["a cat"])
    with pytest.raises(ValueError, match="dtype torch.uint8"):
        hps.score(torch.zeros(1, 3, 32, 32, dtype=torch.uint8), ["a cat"])
    with pytest.raises(ValueError, match="NaN"):
        hps.score(torch.full((1, 3, 32, 32), float("nan")), ["a cat"])


def test_bad_preprocess_mode(hps):
    with pytest.raises(ValueError, match="preprocess must be one of .*'crop'"):
        hps.score(torch.rand(1, 3, 32, 32), ["a cat"], preprocess="crop")


def test_motion_ignores_alpha():
    frames = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    rgba = torch.cat([frames, torch.rand(3, 1, 16, 16)], 1)  # alpha changing between frames
    assert motion_score(rgba) == motion_score(frames)


def test_motion_score_measures_change():
    still = torch.rand(1, 3, 16, 16).repeat(4, 1, 1, 1)
    assert motion_score(still) == 0.0
    assert motion_score(still[:1]) == 0.0
    moving = still.clone()
    moving[2:] = 1 - moving[2:]
    assert motion_score(moving) > 5.0


def test_checkpoint_kind_reads_only_the_header(tmp_path):
    from training.rewards.registry import checkpoint_kind
    from training.rewards.tiny import write_tiny_hps_checkpoint, write_tiny_mps_checkpoint

    hps, mps = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    write_tiny_hps_checkpoint(hps)
    write_tiny_mps_checkpoint(mps)
    assert checkpoint_kind(hps) == "hps" and checkpoint_kind(mps) == "mps"


@pytest.mark.parametrize("shape, message", [
    ((2, 64, 64, 2), r"^candidate_2 has 2 channels \(shape \[2, 64, 64, 2\]\); ComfyUI's IMAGE layout is "
                     r"\[B, H, W, C\] with C = 3 \(RGB\) or 4 \(RGBA\)"),
    ((2, 3, 64, 64), r"^candidate_2 has shape \[2, 3, 64, 64\]: channels first .*permute\(0, 2, 3, 1\)"),
    ((0, 64, 64, 3), r"^candidate_2 is empty \(0 frames\)"),
    ((64, 64, 3), r"^candidate_2 must be an IMAGE batch .* shape \[64, 64, 3\]"),
])
def test_image_batch_errors_name_the_input_and_the_layout(shape, message):
    from training.rewards.preprocess import comfy_image_to_frames

    with pytest.raises(ValueError, match=message) as info:
        comfy_image_to_frames(torch.rand(shape), "candidate_2")
    if shape[-1] == 2:
        assert "permute" not in str(info.value)  # already in ComfyUI's layout: no advice to permute


def test_nan_frames_name_the_input_and_the_frames():
    from training.rewards.preprocess import comfy_image_to_frames

    images = torch.rand(4, 8, 8, 3)
    images[2, 1, 1, 0] = float("nan")
    with pytest.raises(ValueError, match=r"^images has NaN values \(in frames \[2\]\)"):
        comfy_image_to_frames(images, "images")
    assert comfy_image_to_frames(torch.rand(2, 8, 8, 4), "images").shape == (2, 4, 8, 8)


def test_a_lora_is_refused_naming_the_file(tmp_path):
    lora = save_safetensors({"diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.zeros(4, 2)},
                            tmp_path / "reward_lora.safetensors")
    with pytest.raises(UserFileError, match=r"^reward_lora\.safetensors: not an HPS.*diffusion model or LoRA"):
        load_reward_model(lora)
