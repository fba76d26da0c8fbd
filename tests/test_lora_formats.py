"""Every LoRA key format -> canonical naming -> W + strength*alpha/rank*up@down; bad input errors.

Expected weights come from tests/tiny_wan.expected_weight on the LoRA's own tensors,
never from the pack's code.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.helpers.lora_files import FORMAT_NAME, FORMATS, WITH_ALPHA
from tests.helpers.tiny_wan import expected_weight, linear_module_names, random_lora, tiny_wan_state_dict
from training.lora_format import LoraInputError, check_strength, read_lora, save_canonical_lora
from training.lora_match import match_lora, merged_weights, official_reward_lora
from training.lora_keys import parse_key, resolve_module
from training.lora_pairing import expert_of, partner_name
from training.safe_io import UserFileError

STRENGTH = 0.7
BASE = tiny_wan_state_dict(seed=0)
MODULES = linear_module_names()


def _write(tmp_path, name, tensors, metadata=None):
    path = tmp_path / name
    save_file(tensors, str(path), metadata=metadata)
    return path


def _assert_merged(lora_file, lora, strength=STRENGTH, alpha_override=None, modules=None):
    loaded = read_lora(lora_file)
    report = match_lora(loaded, BASE, strength=strength)
    assert report.errors == [] and report.unmatched == {}, report.render()
    merged = merged_weights(BASE, loaded, strength)
    for module in modules or lora:
        up, down, alpha = lora[module]
        want = expected_weight(BASE[f"{module}.weight"], up, down,
                               alpha if alpha_override is None else alpha_override, strength)
        got = merged[f"{module}.weight"]
        assert torch.allclose(got, want, atol=1e-6, rtol=0), f"{module}: {(got - want).abs().max()}"
        assert not torch.allclose(got, BASE[f"{module}.weight"])
    return loaded, report


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_every_format_patches_like_the_formula(tmp_path, fmt):
    lora = random_lora(BASE, MODULES, rank=4, alpha=2.0 if fmt in WITH_ALPHA else None, seed=3)
    tensors = {}
    for module, (up, down, alpha) in lora.items():
        tensors |= FORMATS[fmt](module, up, down, alpha)
    loaded, report = _assert_merged(_write(tmp_path, f"{fmt}.safetensors", tensors), lora)
    assert len(report.matched) == len(MODULES)
    if fmt in FORMAT_NAME:
        assert loaded.format.startswith(FORMAT_NAME[fmt]), loaded.format
    assert set(loaded.tensors) <= {f"diffusion_model.{m}.{p}" for m in MODULES
                                   for p in ("lora_up.weight", "lora_down.weight", "alpha")}


def test_canonical_file_round_trip(tmp_path):
    lora = random_lora(BASE, MODULES, rank=4, alpha=2.0, seed=4)
    path = save_canonical_lora(tmp_path / "out" / "c.safetensors", lora, {"rank": 4, "reward": "HPS2.1"})
    assert os.listdir(tmp_path / "out") == ["c.safetensors"]  # atomic: no temporary left over
    raw = load_file(path)
    assert set(raw) == {f"diffusion_model.{m}.{p}" for m in MODULES for p in ("lora_up.weight", "lora_down.weight", "alpha")}
    assert torch.equal(raw["diffusion_model.blocks.0.self_attn.q.lora_up.weight"], lora["blocks.0.self_attn.q"][0])
    loaded, report = _assert_merged(path, lora)
    assert loaded.metadata["reward"] == "HPS2.1" and loaded.metadata["rank"] == "4"
    assert "ComfyUI, lora_up/lora_down" in report.render()
    assert "effective scale alpha/rank = 0.5 (x strength = 0.35)" in report.render()


def test_report_shows_meaningful_metadata_first_then_counts_the_rest(tmp_path):
    lora = random_lora(BASE, MODULES[:2], rank=4, alpha=2.0, seed=11)
    tensors = {}
    for module, (up, down, alpha) in lora.items():
        tensors |= FORMATS["kohya_musubi"](module, up, down, alpha)
    noise = {f"ss_zz_option_{i}": str(i) for i in range(20)} | {"sshs_model_hash": "ab" * 40, "format": "pt"}
    meaningful = {"steps": "1200", "expert": "low", "reward": "HPS2.1", "base_model": "Wan2.2-A14B",
                  "ss_network_alpha": "2", "ss_network_dim": "4", "network_alpha": "2", "network_dim": "4",
                  "alpha": "2", "rank": "4"}
    metadata = dict(sorted((noise | meaningful).items(), key=lambda kv: kv[0][::-1]))  # neither order above
    text = match_lora(read_lora(_write(tmp_path, "k.safetensors", tensors, metadata)), BASE).render()
    shown = [line.split(":")[0].removeprefix("  metadata ") for line in text.splitlines()
             if line.startswith("  metadata ") and not line.startswith("  metadata:")]
    assert shown == ["rank", "alpha", "network_dim", "network_alpha", "ss_network_dim", "ss_network_alpha",
                     "base_model", "reward", "expert", "steps"]
    assert "  metadata: 21 more keys (ss_zz_option_0, ss_zz_option_1, ss_zz_option_10, ...)" in text
    assert "sshs_model_hash" not in text and "metadata format" not in text


def test_any_format_converts_to_a_canonical_file(tmp_path):
    lora = random_lora(BASE, MODULES, rank=4, alpha=2.0, seed=10)
    tensors = {}
    for module, (up, down, alpha) in lora.items():
        tensors |= FORMATS["lycoris_ai_toolkit"](module, up, down, alpha)
    modules = read_lora(_write(tmp_path, "l.safetensors", tensors)).as_modules()
    assert set(modules) == set(MODULES) and all(a == 2.0 for _, _, a in modules.values())
    _assert_merged(save_canonical_lora(tmp_path / "c.safetensors", modules, {}), lora)


def test_save_refuses_non_native_names_and_rank_mismatch(tmp_path):
    up, down = torch.zeros(128, 4), torch.zeros(4, 128)
    with pytest.raises(ValueError, match="attn1.to_q"):
        save_canonical_lora(tmp_path / "x.safetensors", {"blocks.0.attn1.to_q": (up, down, 4.0)}, {})
    with pytest.raises(ValueError, match=r"up \[128, 4\] and down \[3, 128\]"):
        save_canonical_lora(tmp_path / "x.safetensors", {"blocks.0.self_attn.q": (up, torch.zeros(3, 128), 4.0)}, {})


@pytest.mark.parametrize("rs", [False, True])
def test_peft_alpha_and_rank_stabilised_from_metadata(tmp_path, rs):
    rank, lora_alpha = 4, 8.0
    lora = random_lora(BASE, MODULES, rank=rank, alpha=None, seed=5)
    tensors = {}
    for module, (up, down, _) in lora.items():
        tensors |= FORMATS["peft_diffusers"](module, up, down, None)
    meta = {"lora_adapter_metadata": json.dumps({"transformer.r": rank, "transformer.lora_alpha": lora_alpha,
                                                 "transformer.use_rslora": rs})}
    path = _write(tmp_path, "peft.safetensors", tensors, meta)
    # rsLoRA scales by lora_alpha / sqrt(rank): the canonical alpha is lora_alpha * sqrt(rank)
    canonical_alpha = lora_alpha * math.sqrt(rank) if rs else lora_alpha
    loaded, _ = _assert_merged(path, lora, alpha_override=canonical_alpha)
    assert ("rank-stabilised" in loaded.format) == rs


def test_diff_and_diff_b_pass_through(tmp_path):
    diff = torch.randn(128) * 0.01
    diff_b = torch.randn(128) * 0.01
    path = _write(tmp_path, "diff.safetensors", {"diffusion_model.blocks.0.norm3.diff": diff,
                                                 "diffusion_model.blocks.0.norm3.diff_b": diff_b})
    loaded = read_lora(path)
    merged = merged_weights(BASE, loaded, 0.5)
    assert torch.allclose(merged["blocks.0.norm3.weight"], BASE["blocks.0.norm3.weight"] + 0.5 * diff, atol=1e-7)
    assert torch.allclose(merged["blocks.0.norm3.bias"], BASE["blocks.0.norm3.bias"] + 0.5 * diff_b, atol=1e-7)


@pytest.mark.parametrize("extra", ["dora_scale", "lora_mid.weight", "hada_w1_a", "lokr_w1"])
def test_merge_and_conversion_refuse_parts_they_cannot_represent(tmp_path, extra):
    lora = random_lora(BASE, MODULES[:2], rank=4, alpha=2.0, seed=13)
    tensors = {}
    for module, (up, down, alpha) in lora.items():
        tensors |= FORMATS["comfy_format"](module, up, down, alpha)
    key = f"diffusion_model.{MODULES[0]}.{extra}"
    tensors[key] = torch.ones(1, 4)
    loaded = read_lora(_write(tmp_path, "extra.safetensors", tensors))
    with pytest.raises(LoraInputError, match=rf"cannot merge 1 parts, e\.g\. {re.escape(key)}"):
        merged_weights(BASE, loaded, 0.5)
    with pytest.raises(LoraInputError, match=rf"1 keys are not plain .* e\.g\. {re.escape(key)}"):
        loaded.as_modules()
    # the other module is still merged when asked for alone
    merged = merged_weights(BASE, loaded, 0.5, [MODULES[1]])
    want = expected_weight(BASE[f"{MODULES[1]}.weight"], *lora[MODULES[1]], 0.5)
    assert torch.allclose(merged[f"{MODULES[1]}.weight"], want, atol=1e-6, rtol=0)


def test_merge_refuses_missing_modules_and_conversion_refuses_diff(tmp_path):
    lora = random_lora(BASE, MODULES[:1], rank=4, alpha=2.0, seed=14)
    tensors = FORMATS["comfy_format"](MODULES[0], *lora[MODULES[0]])
    tensors["diffusion_model.blocks.0.cross_attn.k_img.lora_up.weight"] = torch.zeros(128, 4)
    tensors["diffusion_model.blocks.0.cross_attn.k_img.lora_down.weight"] = torch.zeros(4, 128)
    loaded = read_lora(_write(tmp_path, "i2v.safetensors", tensors))
    with pytest.raises(LoraInputError, match=r"blocks\.0\.cross_attn\.k_img \(no such weight in the state dict\)"):
        merged_weights(BASE, loaded, 0.5)
    diff = read_lora(_write(tmp_path, "diff.safetensors", {"diffusion_model.blocks.0.norm3.diff": torch.zeros(128)}))
    with pytest.raises(LoraInputError, match=r"diffusion_model\.blocks\.0\.norm3\.diff"):
        diff.as_modules()


def test_weights_only_pickle_loads(tmp_path):
    lora = random_lora(BASE, MODULES[:4], rank=4, alpha=2.0, seed=6)
    tensors = {}
    for module, (up, down, alpha) in lora.items():
        tensors |= FORMATS["kohya_musubi"](module, up, down, alpha)
    torch.save(tensors, tmp_path / "plain.pt")
    _assert_merged(tmp_path / "plain.pt", lora)
    torch.save({"state_dict": tensors}, tmp_path / "nested.ckpt")
    _assert_merged(tmp_path / "nested.ckpt", lora)


def test_torch_file_under_a_safetensors_name_says_rename(tmp_path):
    torch.save({"a": torch.zeros(2)}, tmp_path / "renamed.safetensors")
    with pytest.raises(LoraInputError, match=r"renamed.safetensors is a PyTorch .* rename it to renamed.pt"):
        read_lora(tmp_path / "renamed.safetensors")


class _Executable:
    def __reduce__(self):
        return (print, ("this would run",))


def test_executable_pickle_is_refused_with_how_to_convert(tmp_path):
    path = tmp_path / "evil.ckpt"
    with open(path, "wb") as handle:
        pickle.dump({"lora_unet_blocks_0_self_attn_q.alpha": _Executable()}, handle)
    with pytest.raises(UserFileError, match=r"evil.ckpt is a pickle that needs code to run .*refers to builtins.print.*"
                                             r"never runs pickled code\. Only if you trust the file's source.*save_file"):
        read_lora(path)
    zipped = tmp_path / "evil_zip.pt"
    torch.save({"a": _Executable()}, zipped)
    with pytest.raises(UserFileError, match=r"evil_zip.pt is a pickle that needs code to run .*refers to print"):
        read_lora(zipped)


@pytest.mark.parametrize("damage", ["truncated_zip", "truncated_legacy", "text", "empty"])
def test_corrupt_pickle_is_not_readable_and_gets_no_convert_advice(tmp_path, damage):
    tensors = FORMATS["kohya_musubi"]("blocks.0.self_attn.q", torch.zeros(128, 4), torch.zeros(4, 128), 2.0)
    path = tmp_path / "bad.pt"
    if damage.startswith("truncated"):
        torch.save(tensors, path, _use_new_zipfile_serialization=damage == "truncated_zip")
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        path.write_bytes(b"" if damage == "empty" else b"this is a text file, not a LoRA")
    with pytest.raises(UserFileError, match=r"bad.pt (is a corrupt or truncated PyTorch checkpoint \(.+\); download it again|is empty \(0 bytes\)|is neither a safetensors file nor a PyTorch checkpoint)") as info:
        read_lora(path)
    assert "weights_only=False" not in str(info.value) and "needs code" not in str(info.value)


def test_not_safetensors_and_corrupt_files(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"this is a text file, not a LoRA")
    with pytest.raises(LoraInputError, match=r"junk.safetensors is neither a safetensors file nor a PyTorch checkpoint"):
        read_lora(junk)
    good = _write(tmp_path, "good.safetensors", FORMATS["comfy_format"]("blocks.0.self_attn.q", torch.zeros(128, 4),
                                                                   torch.zeros(4, 128), 4.0))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(LoraInputError, match=r"cut.safetensors .*download it again"):
        read_lora(cut)
    with pytest.raises(LoraInputError, match="not found"):
        read_lora(tmp_path / "missing.safetensors")


def test_other_architecture_says_what_keys_look_like(tmp_path):
    path = _write(tmp_path, "flux.safetensors", {
        "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(4, 64),
        "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(192, 4)})
    report = match_lora(read_lora(path), BASE, slot="lora_high")
    assert len(report.errors) == 1
    assert "nothing matched" in report.errors[0] and "lora_unet_double_blocks_0_img_attn_qkv" in report.errors[0]
    assert "Flux" in report.errors[0]
    with pytest.raises(LoraInputError, match="nothing matched"):
        report.raise_for_errors()


def test_wan21_i2v_lora_partial_match_is_a_warning_with_counts(tmp_path):
    lora = random_lora(BASE, MODULES, rank=4, alpha=2.0, seed=7)
    tensors = {}
    for module, (up, down, alpha) in lora.items():
        tensors |= FORMATS["videox_fun"](module, up, down, alpha)
    for i in range(2):  # Wan2.1 I2V image branch, absent from Wan2.2
        for name in ("k_img", "v_img"):
            tensors |= FORMATS["videox_fun"](f"blocks.{i}.cross_attn.{name}", torch.zeros(128, 4), torch.zeros(4, 128), 2.0)
    tensors |= FORMATS["videox_fun"]("img_emb.proj.1", torch.zeros(128, 4), torch.zeros(4, 128), 2.0)
    path = _write(tmp_path, "Wan2.1-Fun-14B-InP-MPS.safetensors", tensors)
    loaded = read_lora(path)
    report = match_lora(loaded, BASE, slot="lora_low", strength=0.5, expert="low")
    assert report.errors == []
    text = report.render()
    assert "Wan2.1 image-to-video LoRA" in text and "15 keys" in text
    assert f"partial match: {len(MODULES)} of {len(MODULES) + 5} modules loaded, 15 keys skipped" in text
    assert "MPS reward LoRA on the low-noise expert" in text
    merged = merged_weights(BASE, loaded, 0.5, report.matched)
    for module in MODULES:
        assert torch.allclose(merged[f"{module}.weight"],
                              expected_weight(BASE[f"{module}.weight"], *lora[module], 0.5), atol=1e-6, rtol=0)


def test_modules_without_up_down_pairs_are_not_counted_as_matched(tmp_path):
    lora = random_lora(BASE, MODULES[:2], rank=4, alpha=2.0, seed=12)
    tensors = {}
    for module, (up, down, alpha) in lora.items():
        tensors |= FORMATS["comfy_format"](module, up, down, alpha)
    tensors["diffusion_model.blocks.1.self_attn.q.alpha"] = torch.tensor(2.0)
    tensors["diffusion_model.blocks.1.self_attn.k.dora_scale"] = torch.ones(1, 128)
    report = match_lora(read_lora(_write(tmp_path, "part.safetensors", tensors)), BASE)
    assert report.errors == [] and sorted(report.matched) == sorted(MODULES[:2])
    assert "modules matched: 2 of 4" in report.render()
    warning = next(w for w in report.warnings if "without a lora_up/lora_down pair" in w)
    assert "diffusion_model.blocks.1.self_attn.q.alpha" in warning
    assert "diffusion_model.blocks.1.self_attn.k.dora_scale" in warning
    assert "no lora_up/lora_down pair (only alpha)" in report.unmatched["diffusion_model.blocks.1.self_attn.q.alpha"]

    alphas = {f"lora_unet_{m.replace('.', '_')}.alpha": torch.tensor(2.0) for m in MODULES[:3]}
    report = match_lora(read_lora(_write(tmp_path, "alphas.safetensors", alphas)), BASE)
    assert report.matched == [] and len(report.errors) == 1
    assert "nothing matched" in report.errors[0] and "3 keys belong to modules without a lora_up/lora_down pair" \
        in report.errors[0] and "diffusion_model.blocks.0.self_attn.q.alpha" in report.errors[0]
    with pytest.raises(LoraInputError, match="without a lora_up/lora_down pair"):
        report.raise_for_errors()


def test_shape_mismatch_names_key_and_both_shapes(tmp_path):
    big = tiny_wan_state_dict(dim=256, ffn_dim=512, head_dim=128)
    lora = random_lora(big, MODULES, rank=4, alpha=2.0, seed=8)
    tensors = {}
    for module, (up, down, alpha) in lora.items():
        tensors |= FORMATS["comfy_format"](module, up, down, alpha)
    report = match_lora(read_lora(_write(tmp_path, "wan_5b.safetensors", tensors)), BASE)
    assert report.errors and "shape mismatches in wan_5b.safetensors" in report.errors[0]
    assert ("diffusion_model.blocks.0.cross_attn.k: LoRA up [256, 4] @ down [4, 256] vs model "
            "diffusion_model.blocks.0.cross_attn.k.weight [128, 128]") in report.render()


@pytest.mark.parametrize("value", [10.5, -11, float("nan"), float("inf"), "abc"])
def test_strength_out_of_range(value):
    with pytest.raises(LoraInputError, match="strength_high = "):
        check_strength(value, "strength_high")


def test_strength_in_range():
    assert check_strength(-10, "s") == -10.0 and check_strength("0.6", "s") == 0.6


def test_official_files_and_advice(tmp_path):
    assert official_reward_lora("wan/Wan2.2-Fun-A14B-InP-high-noise-HPS2.1.safetensors") == ("high", "HPS2.1")
    assert official_reward_lora("Wan2.2-Fun-A14B-InP-low-noise-MPS.safetensors") == ("low", "MPS")
    assert official_reward_lora("Wan2.1-Fun-14B-InP-MPS.safetensors") is None
    lora = random_lora(BASE, MODULES[:2], rank=4, alpha=2.0, seed=9)
    tensors = {}
    for module, (up, down, alpha) in lora.items():
        tensors |= FORMATS["videox_fun"](module, up, down, alpha)
    path = _write(tmp_path, "Wan2.2-Fun-A14B-InP-high-noise-HPS2.1.safetensors", tensors)
    text = match_lora(read_lora(path), BASE, slot="lora_low", expert="low").render()
    assert "official Wan2.2-Fun reward LoRA: high-noise expert, reward HPS2.1" in text
    assert "should have rank 128 and alpha 64" in text
    assert "named for the high-noise expert but is loaded on the low-noise model" in text
    assert "MPS reward LoRA" not in text


@pytest.mark.parametrize("key, native", [
    ("lora_unet__blocks_0_self_attn_q.lora_down.weight", "blocks.0.self_attn.q"),
    ("lora_unet_blocks_12_cross_attn_norm_k.diff", "blocks.12.cross_attn.norm_k"),
    ("lora_unet_blocks_3_cross_attn_k_img.alpha", "blocks.3.cross_attn.k_img"),
    ("lora_unet__text_embedding_0.lora_up.weight", "text_embedding.0"),
    ("lora_unet__time_projection_1.alpha", "time_projection.1"),
    ("lycoris_blocks_1_attn2_to_out_0.lora_up.weight", "blocks.1.cross_attn.o"),
    ("lora_unet_blocks_0_self_attn_qq.alpha", None),
])
def test_underscore_names_resolve_against_the_module_table(key, native):
    parsed = parse_key(key)
    got = resolve_module(parsed.module, "_", "native") or resolve_module(parsed.module, "_", "diffusers")
    assert got == native


def test_diffusers_norm_names_are_read_as_diffusers_in_a_diffusers_file(tmp_path):
    # in diffusers names norm2 is the cross-attention norm (native norm3)
    d = torch.randn(128) * 0.01
    path = _write(tmp_path, "d.safetensors", {"transformer.blocks.0.norm2.diff": d,
                                              **FORMATS["peft_diffusers"]("blocks.0.self_attn.q", torch.zeros(128, 4),
                                                                          torch.zeros(4, 128), None)})
    assert "diffusion_model.blocks.0.norm3.diff" in read_lora(path).tensors


@pytest.mark.parametrize("name, expert, partner", [
    ("Wan2.2-Fun-A14B-InP-high-noise-HPS2.1.safetensors", "high", "Wan2.2-Fun-A14B-InP-low-noise-HPS2.1.safetensors"),
    ("wan/x_low_noise.safetensors", "low", "wan/x_high_noise.safetensors"),
    ("lightx2v_4steps_HIGH.safetensors", "high", "lightx2v_4steps_LOW.safetensors"),
    ("HIGH/style-HIGH.safetensors", "high", "LOW/style-LOW.safetensors"),
    ("wan22_HighNoise.safetensors", "high", "wan22_LowNoise.safetensors"),
    ("wan22-lownoise.safetensors", "low", "wan22-highnoise.safetensors"),
    ("x_LOW_NOISE.safetensors", "low", None),
    # ordinary words, not expert markers
    ("highres_fix.safetensors", None, None),
    ("slow_motion.safetensors", None, None),
    ("mps_low_light.safetensors", None, None),
    ("high_detail.safetensors", None, None),
    ("low-res.safetensors", None, None),
    ("High/style-High.safetensors", None, None),
    ("yellow-noise.safetensors", None, None),
])
def test_pairing_rule(name, expert, partner):
    available = ["Wan2.2-Fun-A14B-InP-low-noise-HPS2.1.safetensors", "wan/x_high_noise.safetensors",
                 "lightx2v_4steps_LOW.safetensors", "LOW/style-LOW.safetensors", "lowres_fix.safetensors",
                 "shigh_motion.safetensors", "wan22_LowNoise.safetensors", "wan22-highnoise.safetensors",
                 "mps_high_light.safetensors", "low_detail.safetensors", "high-res.safetensors",
                 "Low/style-Low.safetensors"]
    assert expert_of(name) == expert
    assert partner_name(name, available) == partner


def test_pairing_needs_the_partner_to_exist():
    assert partner_name("a_high_noise.safetensors", ["b_low_noise.safetensors"]) is None
    assert partner_name("HIGH/a_HIGH.safetensors", ["HIGH/a_LOW.safetensors"]) == "HIGH/a_LOW.safetensors"
