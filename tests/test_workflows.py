"""The shipped workflows: JSON structure (no ComfyUI), and every node, link and widget list against a
live /object_info (ComfyUI tier)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import importlib.util

WORKFLOWS = Path(__file__).resolve().parents[1] / "workflows"
_spec = importlib.util.spec_from_file_location("build_workflows", WORKFLOWS / "build_workflows.py")
build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build)
FILES = sorted(WORKFLOWS.glob("*.json"))
MODEL_SUFFIXES = (".safetensors", ".pt", ".pth", ".ckpt", ".png", ".jpg")


def load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def test_every_builder_output_is_shipped():
    assert sorted(p.name for p in FILES) == sorted(build.WORKFLOWS)


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_structure(path):
    wf = load(path)
    assert wf["version"] == 0.4 and isinstance(wf["id"], str)
    nodes = {n["id"]: n for n in wf["nodes"]}
    assert len(nodes) == len(wf["nodes"]) and wf["last_node_id"] >= max(nodes)
    links = {link[0]: link for link in wf["links"]}
    assert len(links) == len(wf["links"]) and wf["last_link_id"] >= max(links)
    for node in wf["nodes"]:
        props = node["properties"]
        expected = "wan-reward-lora" if node["type"].startswith("WanReward") else "comfy-core"
        assert props["cnr_id"] == expected, (node["type"], props)
        assert props["Node name for S&R"] == node["type"]
        for model in props.get("models", []):
            assert set(model) == {"name", "url", "directory"} and model["url"].startswith("https://")
            assert model["url"].endswith(model["name"])
            assert model["name"] in node["widgets_values"], (node["type"], model["name"])
        assert isinstance(node["widgets_values"], list) and len(node["size"]) == 2
        for slot, inp in enumerate(node["inputs"]):
            if inp["link"] is not None:
                link = links[inp["link"]]
                assert link[3] == node["id"] and link[4] == slot, (path.name, node["type"], inp)
        for slot, out in enumerate(node["outputs"]):
            for link_id in out["links"]:
                link = links[link_id]
                assert link[1] == node["id"] and link[2] == slot and link[5] == out["type"]
    for link_id, src, src_slot, dst, dst_slot, kind in wf["links"]:
        assert link_id in nodes[src]["outputs"][src_slot]["links"]
        assert nodes[dst]["inputs"][dst_slot]["link"] == link_id


def _types(wf) -> list[str]:
    return [n["type"] for n in wf["nodes"]]


def test_contents_match_the_issue():
    inp = load(WORKFLOWS / "wan22_fun_inp_reward_lora.json")
    assert _types(inp).count("KSamplerAdvanced") == 2 and "WanFunInpaintToVideo" in _types(inp)
    loader = next(n for n in inp["nodes"] if n["type"] == "WanRewardDualLoraLoader")
    assert loader["widgets_values"][0].endswith("high-noise-HPS2.1.safetensors")
    assert loader["widgets_values"][2].endswith("low-noise-HPS2.1.safetensors")
    samplers = [n["widgets_values"] for n in inp["nodes"] if n["type"] == "KSamplerAdvanced"]
    # split like ComfyUI's templates: high 0 -> k with leftover noise, low k -> end without new noise
    assert samplers[0][0] == "enable" and samplers[0][-1] == "enable" and samplers[1][0] == "disable"
    assert samplers[0][-2] == samplers[1][-3]
    t2v = load(WORKFLOWS / "wan22_t2v_reward_lora.json")
    assert "EmptyHunyuanLatentVideo" in _types(t2v) and "WanRewardDualLoraLoader" in _types(t2v)
    stack = load(WORKFLOWS / "wan22_t2v_lightx2v_reward_lora_stack.json")
    assert _types(stack).count("LoraLoaderModelOnly") == 2 and "WanRewardDualLoraLoader" in _types(stack)
    grid = load(WORKFLOWS / "reward_lora_score_and_compare.json")
    strengths = sorted((n["widgets_values"][1], n["widgets_values"][3]) for n in grid["nodes"]
                       if n["type"] == "WanRewardDualLoraLoader")
    assert strengths == sorted([(h, lo) for h in (0.0, 0.5, 1.0) for lo in (0.0, 0.5, 1.0)] + [(1.0, 1.0)])
    assert "SaveImage" in _types(grid) and "PreviewAny" in _types(grid)
    assert _types(grid).count("WanRewardScoreFrames") == 2 * (9 + 2)
    train = load(WORKFLOWS / "reward_lora_train_and_preview.json")
    node = next(n for n in train["nodes"] if n["type"] == "WanRewardLoraTrain")
    loader = next(n for n in train["nodes"] if n["type"] == "WanRewardDualLoraLoader")
    lora_link = next(i["link"] for i in loader["inputs"] if i["name"] == "lora_low")
    assert [lk for lk in train["links"] if lk[0] == lora_link][0][1] == node["id"]


# ---- ComfyUI tier ------------------------------------------------------------------------------

def _compatible(received: str, wanted) -> bool:
    if wanted == "*" or received == "*":
        return True
    return bool(set(received.split(",")) & set(str(wanted).split(",")))


@pytest.mark.comfyui
@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_against_object_info(comfyui, path):
    info = comfyui.object_info()
    wf = load(path)
    nodes = {n["id"]: n for n in wf["nodes"]}
    for node in wf["nodes"]:
        assert node["type"] in info, f"{path.name}: node type {node['type']} is not registered"
        spec = info[node["type"]]
        names = build.widget_names(spec)
        assert len(node["widgets_values"]) == len(names), (path.name, node["type"], names, node["widgets_values"])
        specs = {name: (kind, opts) for name, kind, opts, _ in build.input_specs(spec)}
        for name, value in zip(names, node["widgets_values"]):
            if name not in specs:
                continue
            kind, opts = specs[name]
            if kind == "COMBO" and not (isinstance(value, str) and value.lower().endswith(MODEL_SUFFIXES)):
                options = opts.get("options") or (spec["input"].get("required", {}).get(name)
                                                  or spec["input"].get("optional", {}).get(name))[0]
                if value != "None":
                    assert value in options, (path.name, node["type"], name, value)
            elif kind == "INT":
                assert isinstance(value, int) and opts.get("min", value) <= value <= opts.get("max", value)
            elif kind == "FLOAT":
                assert isinstance(value, (int, float)) and opts.get("min", value) <= value <= opts.get("max", value)
        for inp in node["inputs"]:
            assert inp["name"] in specs, (path.name, node["type"], inp["name"])
    for link_id, src, src_slot, dst, dst_slot, kind in wf["links"]:
        out_type = info[nodes[src]["type"]]["output"][src_slot]
        assert kind == out_type, (path.name, link_id, kind, out_type)
        name = nodes[dst]["inputs"][dst_slot]["name"]
        wanted = dict((n, k) for n, k, _, _ in build.input_specs(info[nodes[dst]["type"]]))[name]
        assert _compatible(out_type, wanted), (path.name, nodes[dst]["type"], name, out_type, wanted)


@pytest.mark.comfyui
def test_workflows_are_up_to_date(comfyui):
    """Rebuilding from the live /object_info gives the committed files (regenerate with
    python workflows/build_workflows.py --url <ComfyUI> after a node's inputs change)."""
    info = comfyui.object_info()
    for name, make in build.WORKFLOWS.items():
        assert make(info) == load(WORKFLOWS / name), f"{name} is out of date: run workflows/build_workflows.py"
