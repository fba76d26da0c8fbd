"""The LoRA and reward readers answer damaged files with a refusal naming the file, never a
crash, a hang or an allocation the file does not back: a bounded hypothesis fuzz run in a
subprocess (tests/helpers/fuzz_readers.py), and the cases it found, each as a plain test."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.helpers import PACK_ROOT
from tests.helpers.fuzz_readers import _encode_int, _pickle_ops
from training.lora_format import LoraInputError, read_lora, save_canonical_lora
from training.rewards.registry import checkpoint_kind, read_state_dict
from training.safe_io import UserFileError, load_torch_weights_only
from training.torch_file_check import torch_file_problem

FUZZ = "tests.helpers.fuzz_readers"


def test_fuzzed_files_are_refused_by_name_or_loaded(tmp_path):
    """~2100 mutated files (300 per seed, the same ones each run): a crash of the process fails
    through the exit code, a hang through the timeout, a large allocation through the address
    space limit inside the fuzzer."""
    try:
        result = subprocess.run([sys.executable, "-m", FUZZ, "--out", str(tmp_path), "--examples", "300"],
                                cwd=PACK_ROOT, capture_output=True, text=True, timeout=55, check=False)
    except subprocess.TimeoutExpired as exc:
        case = tmp_path / "current.txt"
        pytest.fail(f"the fuzz run hung; last case: {case.read_text() if case.exists() else '?'}\n{exc.stdout}")
    assert result.returncode == 0, (f"exit code {result.returncode}\n{result.stdout[-6000:]}\n"
                                    f"{result.stderr[-3000:]}")
    counts = json.loads(result.stdout.split("outcomes ", 1)[1])
    assert len(counts) == 7
    for name, tally in counts.items():  # every seed was exercised and both outcomes occur
        assert tally["loaded"] + tally["refused"] >= 300 and tally["loaded"] and tally["refused"], (name, tally)


# ---- the cases the fuzzer found ----------------------------------------------------------

def _replace_int(blob: bytes, old: int, new: int, nth: int = 0, starts=(0,)) -> bytes:
    """The pickle(s) with the ``nth`` integer opcode of value ``old`` replaced by ``new``."""
    found = [op for s in starts for op in _pickle_ops(blob, s)
             if op[0] in ("BININT", "BININT1", "BININT2", "LONG1") and op[1] == old]
    _, _, lo, hi = found[nth]
    return blob[:lo] + _encode_int(new) + blob[hi:]


def _legacy_starts(blob: bytes) -> list[int]:
    starts, pos = [], 0
    for _ in range(4):
        starts.append(pos)
        pos = _pickle_ops(blob, pos)[-1][3]
    return starts


@pytest.fixture
def small_address_space():
    """What is mapped now plus 1 GiB: an allocation the file does not back fails loudly."""
    import re

    mapped = int(re.search(r"VmSize:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024
    old = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (mapped + (1 << 30), old[1]))
    yield
    resource.setrlimit(resource.RLIMIT_AS, old)


def test_legacy_pickle_claiming_a_huge_storage_is_refused_before_allocating(tmp_path, small_address_space):
    path = tmp_path / "HPS_v2.1_compressed.pt"
    torch.save({"w": torch.ones(16)}, path, _use_new_zipfile_serialization=False)
    blob = path.read_bytes()
    path.write_bytes(_replace_int(blob, 16, 2 ** 31 - 1, starts=_legacy_starts(blob)[3:]))  # the storage's numel
    assert "claims 8589934588 bytes of tensor data, more than the whole file" in torch_file_problem(path)
    with pytest.raises(UserFileError, match=r"HPS_v2.1_compressed.pt is a corrupt or truncated PyTorch checkpoint "
                                            r"\(its pickle claims 8589934588 bytes"):
        read_state_dict(path)
    with pytest.raises(UserFileError, match=r"HPS_v2.1_compressed.pt is a corrupt or truncated PyTorch checkpoint \(its pickle claims"):
        load_torch_weights_only(path, "LoRA file")


@pytest.mark.parametrize("zipped", [False, True])
def test_tensor_reaching_past_its_storage_is_refused(tmp_path, zipped, small_address_space):
    """torch.load would grow the storage to fit the view (found: 8 GiB from a 400-byte file)."""
    path = tmp_path / "reward.pt"
    torch.save({"w": torch.ones(16)}, path, _use_new_zipfile_serialization=zipped)
    blob = path.read_bytes()
    if zipped:  # the view's shape (16,) -> (2**31 - 1,) inside data.pkl
        with zipfile.ZipFile(path) as archive:
            members = {i.filename: archive.read(i) for i in archive.infolist()}
        name = next(n for n in members if n.endswith("data.pkl"))
        members[name] = _replace_int(members[name], 16, 2 ** 31 - 1, nth=1)
        with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
            for member, data in members.items():
                archive.writestr(member, data)
    else:
        path.write_bytes(_replace_int(blob, 16, 2 ** 31 - 1, nth=1, starts=_legacy_starts(blob)[3:]))
    assert "a tensor of shape [2147483647]" in torch_file_problem(path)
    with pytest.raises(UserFileError, match=r"reward.pt is a corrupt or truncated PyTorch checkpoint \(a tensor of "
                                            r"shape \[2147483647\] .* needs 8589934588 bytes of its storage"):
        read_state_dict(path)


def test_non_zip_file_read_as_a_pickle_with_a_huge_length_is_refused(tmp_path, small_address_space):
    """torch.load reads any file that is not a zip as a pickle: 'X' + 4 length bytes asks it to
    read a 1 GiB string (found: a zip LoRA whose first byte was damaged)."""
    path = tmp_path / "lora.pt"
    path.write_bytes(b"X\x4b\x03\x44\x40" + b"\0" * 2000)
    with pytest.raises(UserFileError, match=r"lora.pt is neither a safetensors file nor a PyTorch checkpoint"):
        read_lora(path)  # refused from its first bytes, before torch.load sees it
    with pytest.raises(UserFileError, match=r"lora.pt is a corrupt or truncated PyTorch checkpoint \(its pickle is "
                                            r"incomplete or damaged \(expected 1078199115 bytes in a unicodestring4"):
        load_torch_weights_only(path, "LoRA file")  # read as a pickle all the same: refused before allocating


def test_zip_storage_larger_than_its_record_is_refused(tmp_path):
    path = tmp_path / "lora.pt"
    torch.save({"w": torch.ones(16)}, path)
    with zipfile.ZipFile(path) as archive:
        members = {i.filename: archive.read(i) for i in archive.infolist()}
    name = next(n for n in members if n.endswith("data.pkl"))
    members[name] = _replace_int(members[name], 16, 32)  # the storage's numel, the view unchanged
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for member, data in members.items():
            archive.writestr(member, data)
    assert torch_file_problem(path) == "storage data/0 claims 128 bytes but the archive holds 64"


def test_damaged_zip_headers_are_refused_by_name(tmp_path):
    """zipfile raises BadZipFile / NotImplementedError (not OSError) for some damaged headers."""
    path = tmp_path / "hps.pt"
    torch.save({"w": torch.ones(4)}, path)
    blob = bytearray(path.read_bytes())
    locator = blob.rindex(b"PK\x06\x07")  # torch writes zip64 records: claim that the archive spans disks
    blob[locator + 16] = 2
    path.write_bytes(bytes(blob))
    with pytest.raises(UserFileError, match=r"hps.pt is a corrupt or truncated PyTorch checkpoint \(its zip "
                                            r"archive is damaged"):
        read_state_dict(path)
    blob[0] ^= 1  # no longer starts as a zip: torch.load fails, the reason-finder must not raise
    path.write_bytes(bytes(blob))
    with pytest.raises(UserFileError, match="hps.pt"):
        load_torch_weights_only(path, "LoRA file")


def _lora(tmp_path, **tensors) -> Path:
    base = {"diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.ones(8, 2),
            "diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.ones(2, 8),
            "diffusion_model.blocks.0.self_attn.q.alpha": torch.tensor(2.0)}
    base.update({f"diffusion_model.blocks.0.self_attn.q.{k.replace('__', '.')}": v for k, v in tensors.items()})
    path = tmp_path / "bad_lora.safetensors"
    save_file(base, str(path))
    return path


@pytest.mark.parametrize("tensors,match", [
    ({"lora_down__weight": torch.ones(2, 8, dtype=torch.int16)},
     r"lora_down.weight is int16 \[2, 8\]; a LoRA's lora_down must be a non-empty floating-point matrix"),
    ({"lora_up__weight": torch.ones(8, 0), "lora_down__weight": torch.ones(0, 8)}, r"lora_down.weight is float32 \[0, 8\]"),
    ({"lora_down__weight": torch.ones(8)}, r"lora_down.weight is float32 \[8\]"),
    ({"alpha": torch.ones(3)}, r"alpha is float32 \[3\]; a LoRA's alpha must be one finite number"),
    ({"alpha": torch.tensor(float("inf"))}, r"alpha is float32 \[\] = inf"),
    ({"diff_b": torch.ones(8, dtype=torch.int32)}, r"diff_b is int32 \[8\]; a LoRA's diff_b must be floating point"),
])
def test_lora_tensors_no_loader_can_use_are_refused_naming_the_key(tmp_path, tensors, match):
    with pytest.raises(LoraInputError, match=r"LoRA file bad_lora.safetensors: diffusion_model.blocks.0.self_attn.q."
                                             + match + ".*download it again"):
        read_lora(_lora(tmp_path, **tensors))


@pytest.mark.parametrize("value", ["", "abc", "nan", "1e309"])
def test_peft_alpha_metadata_that_is_not_a_number_is_refused(tmp_path, value):
    path = tmp_path / "adapter_model.safetensors"
    save_file({"transformer.blocks.0.attn1.to_q.lora_A.weight": torch.ones(2, 8),
               "transformer.blocks.0.attn1.to_q.lora_B.weight": torch.ones(8, 2)}, str(path),
              metadata={"lora_alpha": value})
    with pytest.raises(LoraInputError, match=f"adapter_model.safetensors: its metadata lora_alpha = {value!r} is not "
                                             "a finite number"):
        read_lora(path)


def test_usable_loras_still_load(tmp_path):
    path = save_canonical_lora(tmp_path / "good.safetensors", {"blocks.0.self_attn.q": (
        torch.ones(8, 2, dtype=torch.bfloat16), torch.ones(2, 8, dtype=torch.bfloat16), 2.0)}, {})
    assert sorted(read_lora(path).modules["blocks.0.self_attn.q"]) == ["alpha", "lora_down.weight", "lora_up.weight"]
    lora = read_lora(_lora(tmp_path, alpha=torch.tensor(4, dtype=torch.int64)))  # an integer alpha is a number
    assert float(lora.tensors["diffusion_model.blocks.0.self_attn.q.alpha"]) == 4.0


def test_whole_module_pickle_with_odd_fields_is_read_or_refused(tmp_path):
    """The restricted reader walks recorded module state that a damaged file may fill with anything."""
    from training.rewards.pickled_module import Stub, _module_state_dict

    class Odd(Stub):
        pass

    odd = Odd()
    odd.__setstate__({"_parameters": {"w": torch.ones(2)}, "_buffers": ["not", "a", "dict"],
                      "_non_persistent_buffers_set": Odd(), "_modules": {"child": 3, 5: Odd()}})
    assert list(_module_state_dict(odd)) == ["w"]


def test_checkpoint_kind_of_an_unknown_or_damaged_file_names_it(tmp_path):
    path = tmp_path / "clip.safetensors"
    save_file({"vision_model.x": torch.ones(1)}, str(path))
    with pytest.raises(UserFileError, match=r"reward model checkpoint .*clip.safetensors: not an HPS v2.1"):
        checkpoint_kind(path)
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(UserFileError, match=r"clip.safetensors is a corrupt or truncated safetensors file"):
        checkpoint_kind(path)
