"""The Wan Dual LoRA Loader inside a real ComfyUI: two tiny experts, LoRAs in every format
of test_lora_formats (plus rsLoRA and .diff/.diff_b), patched by ComfyUI itself.

Patched weights are read back with the test-only probe node (tests/comfy_probe_pack),
which loads the model the way a sampler does, and compared with W + s*alpha/r*up@down
computed here.
"""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.helpers.tiny_wan import expected_weight, linear_module_names, random_lora, tiny_wan_state_dict
from training.wan_names import native_to_diffusers

pytestmark = pytest.mark.comfyui
Q = "blocks.1.self_attn.q"  # a module every LoRA below patches
CHECKED = ("blocks.0.self_attn.q", "blocks.1.cross_attn.o", "blocks.1.ffn.2", "head.head")


def _underscore(lora, prefix):
    """kohya-style keys: ``lora_unet__`` (VideoX-Fun) or ``lora_unet_`` (kohya/musubi) + underscored module."""
    out = {}
    for m, (up, down, alpha) in lora.items():
        base = prefix + m.replace(".", "_")
        out |= {base + ".lora_up.weight": up, base + ".lora_down.weight": down, base + ".alpha": torch.tensor(alpha)}
    return out


def _diffusers(lora):
    """PEFT/diffusers names, no alpha (ComfyUI then uses scale 1.0: alpha = rank)."""
    return {f"transformer.{native_to_diffusers(m)}.lora_{ab}.weight": t
            for m, (up, down, _) in lora.items() for ab, t in (("A", down), ("B", up))}


@pytest.fixture(scope="module")
def setup(comfyui):
    experts = {"high": tiny_wan_state_dict(seed=10), "low": tiny_wan_state_dict(seed=11)}
    for name, sd in experts.items():
        save_file(sd, comfyui.model_path("diffusion_models", f"tiny_wan_{name}.safetensors"))
    modules = linear_module_names()
    loras = {
        "videox_high": random_lora(experts["high"], modules, rank=4, alpha=2.0, seed=1),
        "kohya_high": random_lora(experts["high"], modules[:8], rank=8, alpha=4.0, seed=2),
        "diffusers_low": random_lora(experts["low"], modules, rank=4, alpha=None, seed=3),
    }
    save_file(_underscore(loras["videox_high"], "lora_unet__"), comfyui.model_path("loras", "wan/reward-high-noise.safetensors"))
    save_file(_underscore(loras["kohya_high"], "lora_unet_"), comfyui.model_path("loras", "kohya_style.safetensors"))
    save_file(_diffusers(loras["diffusers_low"]), comfyui.model_path("loras", "wan/reward-low-noise.safetensors"))
    save_file({"double_blocks.0.img_attn.qkv.lora_A.weight": torch.zeros(4, 8)},
              comfyui.model_path("loras", "flux_style.safetensors"))
    return experts, loras


def _graph(lora_high, strength_high, lora_low, strength_low):
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "tiny_wan_high.safetensors", "weight_dtype": "default"}},
        "2": {"class_type": "UNETLoader", "inputs": {"unet_name": "tiny_wan_low.safetensors", "weight_dtype": "default"}},
        "3": {"class_type": "WanRewardDualLoraLoader", "inputs": {
            "model_high": ["1", 0], "model_low": ["2", 0], "lora_high": lora_high,
            "strength_high": strength_high, "lora_low": lora_low, "strength_low": strength_low}},
    }


def _probe(prompt, node_id, source, filename):
    prompt[node_id] = {"class_type": "ProbeSaveModelWeights", "inputs": {"model": source, "filename": filename}}


def test_object_info_lists_the_loader(comfyui):
    info = comfyui.object_info()["WanRewardDualLoraLoader"]
    assert info["display_name"] == "Wan2.2 Dual LoRA Loader (High + Low Noise)"
    assert list(info["input"]["required"]) == ["model_high", "model_low", "lora_high", "strength_high",
                                               "lora_low", "strength_low"]
    assert info["output_name"] == ["model_high", "model_low", "report"]


def test_dual_loader_patches_both_experts(comfyui, setup):
    experts, loras = setup
    prompt = _graph("wan/reward-high-noise.safetensors", 0.6, "wan/reward-low-noise.safetensors", 0.7)
    # chained second loader: stacks a kohya LoRA on the high expert, nothing on the low one
    prompt["4"] = {"class_type": "WanRewardDualLoraLoader", "inputs": {
        "model_high": ["3", 0], "model_low": ["3", 1], "lora_high": "kohya_style.safetensors",
        "strength_high": 0.3, "lora_low": "None", "strength_low": 1.0}}
    # core's loader with the diffusers-named LoRA: ComfyUI ignores those keys
    prompt["5"] = {"class_type": "LoraLoaderModelOnly", "inputs": {
        "model": ["2", 0], "lora_name": "wan/reward-low-noise.safetensors", "strength_model": 0.7}}
    _probe(prompt, "10", ["4", 0], "high")
    _probe(prompt, "11", ["4", 1], "low")
    _probe(prompt, "12", ["5", 0], "core_low")
    outputs = comfyui.run(prompt)

    report = outputs["3"]["text"][0]
    assert "VideoX-Fun" in report and "modules matched: 26 of 26" in report
    assert "partner file found: wan/reward-low-noise.safetensors" in report

    high = load_file(comfyui.output / "high.safetensors")
    low = load_file(comfyui.output / "low.safetensors")
    core_low = load_file(comfyui.output / "core_low.safetensors")
    for module in CHECKED:
        key = f"diffusion_model.{module}.weight"
        want_high = expected_weight(experts["high"][f"{module}.weight"], *loras["videox_high"][module], 0.6)
        if module in loras["kohya_high"]:
            up, down, alpha = loras["kohya_high"][module]
            want_high = want_high + 0.3 * alpha / down.shape[0] * (up @ down)
        want_low = expected_weight(experts["low"][f"{module}.weight"], *loras["diffusers_low"][module], 0.7)
        assert torch.allclose(high[key], want_high, atol=1e-6, rtol=0), module
        assert torch.allclose(low[key], want_low, atol=1e-6, rtol=0), module
        # core LoraLoaderModelOnly left the weight as it was
        assert torch.equal(core_low[key], experts["low"][f"{module}.weight"]), module
    assert not torch.equal(low[f"diffusion_model.{Q}.weight"], experts["low"][f"{Q}.weight"])


def _format_cases(experts):
    """{case: (expert, file tensors, metadata, {model key: expected weight})} for every format
    of test_lora_formats (and rsLoRA, .diff/.diff_b), each on one expert at its own strength."""
    import json
    import math

    from tests.helpers.lora_files import FORMATS, WITH_ALPHA

    modules = linear_module_names()
    cases = {}
    for i, fmt in enumerate(sorted(FORMATS) + ["rslora"]):
        expert = ("high", "low")[i % 2]
        strength = round(0.3 + 0.05 * i, 2)
        sd = experts[expert]
        lora = random_lora(sd, modules, rank=4, alpha=2.0 if fmt in WITH_ALPHA else None, seed=100 + i)
        tensors = {}
        for m, (up, down, alpha) in lora.items():
            tensors |= FORMATS["peft_diffusers" if fmt == "rslora" else fmt](m, up, down, alpha)
        metadata, alpha_of = None, (lambda a: a)
        if fmt == "rslora":  # scale lora_alpha / sqrt(rank): as alpha/rank with alpha = lora_alpha * sqrt(rank)
            metadata = {"lora_adapter_metadata": json.dumps(
                {"transformer.r": 4, "transformer.lora_alpha": 8.0, "transformer.use_rslora": True})}
            alpha_of = lambda a: 8.0 * math.sqrt(4)  # noqa: E731
        want = {f"diffusion_model.{m}.weight": expected_weight(sd[f"{m}.weight"], up, down, alpha_of(alpha), strength)
                for m, (up, down, alpha) in lora.items()}
        cases[fmt] = (expert, strength, tensors, metadata, want)
    # ComfyUI's full-weight differences: on a norm (weight and bias) and on a Linear
    gen = torch.Generator().manual_seed(7)
    diffs = {m: (torch.randn(sd_shape, generator=gen) * 0.01, torch.randn(b_shape, generator=gen) * 0.01)
             for m, sd_shape, b_shape in (("blocks.0.norm3", (128,), (128,)), ("blocks.1.self_attn.k", (128, 128), (128,)))}
    want = {}
    for m, (d, db) in diffs.items():
        want[f"diffusion_model.{m}.weight"] = experts["low"][f"{m}.weight"].float() + 0.8 * d
        want[f"diffusion_model.{m}.bias"] = experts["low"][f"{m}.bias"].float() + 0.8 * db
    cases["diff_diff_b"] = ("low", 0.8, {f"diffusion_model.{m}.{p}": t for m, (d, db) in diffs.items()
                                         for p, t in (("diff", d), ("diff_b", db))}, None, want)
    return cases


def test_every_format_patches_like_the_formula_in_comfyui(comfyui, setup):
    """One prompt: one loader per pair of formats, each expert probed; ComfyUI's own patching."""
    experts, _ = setup
    cases = _format_cases(experts)
    assert len(cases) == 15  # the 13 key formats of test_lora_formats, rsLoRA, diff/diff_b
    prompt = _graph("None", 1.0, "None", 1.0)
    by_expert = {"high": [], "low": []}
    for name, (expert, strength, tensors, metadata, _) in cases.items():
        save_file(tensors, comfyui.model_path("loras", f"formats/{name}.safetensors"), metadata=metadata)
        by_expert[expert].append(name)
    node = 100
    pairs = [(by_expert["high"][i] if i < len(by_expert["high"]) else None,
              by_expert["low"][i] if i < len(by_expert["low"]) else None)
             for i in range(max(map(len, by_expert.values())))]
    for high, low in pairs:
        prompt[str(node)] = {"class_type": "WanRewardDualLoraLoader", "inputs": {
            "model_high": ["1", 0], "model_low": ["2", 0],
            "lora_high": f"formats/{high}.safetensors" if high else "None",
            "strength_high": cases[high][1] if high else 1.0,
            "lora_low": f"formats/{low}.safetensors" if low else "None",
            "strength_low": cases[low][1] if low else 1.0}}
        for output, name in enumerate((high, low)):
            if name:
                _probe(prompt, f"{node}{output}", [str(node), output], f"format_{name}")
        node += 1
    outputs = comfyui.run(prompt)
    reports = "\n".join(outputs[str(n)]["text"][0] for n in range(100, node))
    assert "WARNING" not in reports and "\n  unmatched: " not in reports, reports
    for name, (expert, _, _, _, want) in cases.items():
        got = load_file(comfyui.output / f"format_{name}.safetensors")
        for key, value in want.items():
            assert torch.allclose(got[key], value, atol=1e-6, rtol=0), (name, key, (got[key] - value).abs().max())
        untouched = "diffusion_model.blocks.0.norm3.weight" if name != "diff_diff_b" else \
            "diffusion_model.blocks.0.self_attn.q.weight"
        assert torch.equal(got[untouched], experts[expert][untouched.removeprefix("diffusion_model.")].float()), name


def test_unet_loader_detects_tiny_experts_as_wan(comfyui, setup):
    from safetensors import safe_open

    prompt = _graph("None", 1.0, "None", 1.0)
    _probe(prompt, "10", ["3", 0], "plain_high")
    outputs = comfyui.run(prompt)
    assert "None (model passed through unchanged)" in outputs["3"]["text"][0]
    with safe_open(str(comfyui.output / "plain_high.safetensors"), "pt") as f:
        assert f.metadata()["model_class"] == "WAN21"


def test_lora_of_another_architecture_fails_with_what_keys_look_like(comfyui, setup):
    prompt = _graph("flux_style.safetensors", 1.0, "None", 1.0)
    _probe(prompt, "10", ["3", 0], "never")
    message = comfyui.run_expecting_error(prompt)
    assert "nothing matched" in message and "double_blocks.0.img_attn.qkv" in message
    assert "Flux" in message


def test_strength_out_of_range_is_rejected_with_the_value(comfyui, setup):
    prompt = _graph("wan/reward-high-noise.safetensors", 25.0, "None", 1.0)
    _probe(prompt, "10", ["3", 0], "never")
    with pytest.raises(AssertionError, match=r"strength_high = 25.0 is out of range"):
        comfyui.queue(prompt)


def test_strength_change_reuses_the_read_file_and_a_replaced_file_is_re_read(comfyui, setup):
    """The file cache survives a strength change; a file replaced in place (same size, old
    mtime put back) or atomically (new inode) is read again, even at an unchanged strength."""
    experts, _ = setup
    module = "blocks.0.cross_attn.v"
    loras = [random_lora(experts["high"], [module], rank=4, alpha=4.0, seed=21 + i) for i in range(3)]
    path = comfyui.model_path("loras", "cache_probe.safetensors")
    save_file(_underscore(loras[0], "lora_unet_"), path)
    stat = path.stat()

    def patched(strength, name):
        prompt = _graph("cache_probe.safetensors", strength, "None", 1.0)
        _probe(prompt, "10", ["3", 0], name)
        comfyui.run(prompt)
        return load_file(comfyui.output / f"{name}.safetensors")[f"diffusion_model.{module}.weight"]

    base = experts["high"][f"{module}.weight"]
    assert torch.allclose(patched(0.5, "cache1"), expected_weight(base, *loras[0][module], 0.5), atol=1e-6, rtol=0)
    # the same tensors are served for a new strength (the file is unchanged)
    assert torch.allclose(patched(0.25, "cache2"), expected_weight(base, *loras[0][module], 0.25), atol=1e-6, rtol=0)
    save_file(_underscore(loras[1], "lora_unet_"), path)  # in place, same size, then the old mtime back
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns
    assert torch.allclose(patched(0.2, "cache3"), expected_weight(base, *loras[1][module], 0.2), atol=1e-6, rtol=0)
    other = path.with_name("cache_probe.tmp")
    save_file(_underscore(loras[2], "lora_unet_"), other)
    os.utime(other, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    os.replace(other, path)  # atomic replace: new inode, same size and mtime
    assert torch.allclose(patched(0.2, "cache4"), expected_weight(base, *loras[2][module], 0.2), atol=1e-6, rtol=0)


def test_frontend_extension_is_served(comfyui):
    extensions = comfyui.get("/extensions").json()
    served = [e for e in extensions if e.endswith("/dual_lora_loader.js")]
    assert served, extensions
    assert "registerExtension" in comfyui.get(served[0]).text
    pairing = served[0].replace("dual_lora_loader.js", "lora_pairing.js")
    assert "export function partnerName" in comfyui.get(pairing).text


def test_block_strengths_scale_the_patches_of_their_blocks(comfyui, setup):
    """block_strengths_high '0:0.5, 1:0' with strength 0.6: block 0 gets 0.3 x the LoRA, block 1 none, the
    head the full 0.6; the low expert's 'attention_only' leaves its FFN and head unpatched."""
    experts, loras = setup
    prompt = _graph("wan/reward-high-noise.safetensors", 0.6, "wan/reward-low-noise.safetensors", 0.7)
    prompt["3"]["inputs"].update(block_strengths_high="0:0.5, 1:0", block_strengths_low="attention_only")
    _probe(prompt, "10", ["3", 0], "blocks_high")
    _probe(prompt, "11", ["3", 1], "blocks_low")
    outputs = comfyui.run(prompt)
    report = outputs["3"]["text"][0]
    assert "block strengths (0:0.5, 1:0): blocks 0 x0.5, 1 x0" in report, report
    assert "preset attention_only (ffn, modules outside the blocks x0)" in report
    high = load_file(comfyui.output / "blocks_high.safetensors")
    low = load_file(comfyui.output / "blocks_low.safetensors")
    for module, factor in (("blocks.0.self_attn.q", 0.5), ("blocks.0.ffn.2", 0.5), ("blocks.1.cross_attn.o", 0.0),
                           ("head.head", 1.0)):
        want = expected_weight(experts["high"][f"{module}.weight"], *loras["videox_high"][module], 0.6 * factor)
        assert torch.allclose(high[f"diffusion_model.{module}.weight"], want, atol=1e-6, rtol=0), module
    for module, factor in (("blocks.1.self_attn.k", 1.0), ("blocks.0.cross_attn.q", 1.0), ("blocks.0.ffn.0", 0.0),
                           ("head.head", 0.0)):
        want = expected_weight(experts["low"][f"{module}.weight"], *loras["diffusers_low"][module], 0.7 * factor)
        assert torch.allclose(low[f"diffusion_model.{module}.weight"], want, atol=1e-6, rtol=0), module


def test_invalid_block_strengths_are_refused_naming_the_text(comfyui, setup):
    prompt = _graph("wan/reward-high-noise.safetensors", 0.6, "None", 1.0)
    prompt["3"]["inputs"]["block_strengths_high"] = "0-9:nan"
    _probe(prompt, "10", ["3", 0], "never")
    with pytest.raises(AssertionError, match=r"block_strengths_high = '0-9:nan': .*finite number"):
        comfyui.queue(prompt)  # refused before anything runs
    prompt["3"]["inputs"]["block_strengths_high"] = "0-5:1.0"  # valid text, but the tiny experts have 2 blocks
    message = comfyui.run_expecting_error(prompt)
    assert "block_strengths_high = '0-5:1.0': block 5 in '0-5:1.0' is beyond the model's 2 blocks" in message


def test_an_unreadable_lora_is_refused_naming_the_input_and_the_file(comfyui, setup):
    path = comfyui.model_path("loras", "truncated-low-noise.safetensors")
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": ")  # a header cut short
    prompt = _graph("None", 1.0, "truncated-low-noise.safetensors", 0.5)
    _probe(prompt, "10", ["3", 1], "never")
    message = comfyui.run_expecting_error(prompt)
    assert "lora_low: LoRA file " in message, message
    assert "truncated-low-noise.safetensors is a corrupt or truncated safetensors file" in message, message
