"""The shipped workflows: JSON structure, layout (steps in groups, no overlapping nodes) and notes (no
ComfyUI); every node, link and widget list against a live /object_info, and each one run on tiny
models (ComfyUI tier)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import importlib.util

from tests.helpers.workflow_layout import overlapping

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / "workflows"
_spec = importlib.util.spec_from_file_location("build_workflows", ROOT / "tools" / "build_workflows.py")
build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build)
FILES = sorted(WORKFLOWS.glob("*.json"))
MODEL_SUFFIXES = (".safetensors", ".pt", ".pth", ".ckpt", ".png", ".jpg")


def load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def test_every_builder_output_is_shipped():
    assert sorted(p.name for p in FILES) == sorted(build.WORKFLOWS)
    # the folder is served as static files: only workflows and their thumbnails live there
    assert sorted(p.name for p in WORKFLOWS.iterdir()) == sorted(
        [p.name for p in FILES] + [p.with_suffix(".jpg").name for p in FILES])


def _boxes(wf) -> dict:
    """{node id: (x0, y0, x1, y1)} with the title bar LiteGraph draws above pos."""
    return {n["id"]: (n["pos"][0], n["pos"][1] - build.TITLE_HEIGHT, n["pos"][0] + n["size"][0],
                      n["pos"][1] + n["size"][1]) for n in wf["nodes"]}


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_layout_steps_left_to_right_without_overlaps(path):
    wf = load(path)
    assert not overlapping(_boxes(wf)), path.name
    groups = wf["groups"]
    titles = [g["title"] for g in groups]
    assert titles[0] == "Step 1 - Load models" or titles[0].startswith("Step 1 - Load")
    assert [t.split(" - ")[0] for t in titles] == [f"Step {i}" for i in range(1, len(titles) + 1)], titles
    lefts = [g["bounding"][0] for g in groups]
    assert lefts == sorted(lefts)  # left to right by stage
    for g1, g2 in zip(groups, groups[1:]):
        assert g1["bounding"][0] + g1["bounding"][2] < g2["bounding"][0], (g1["title"], g2["title"])
    for node, (x0, y0, x1, y1) in _boxes(wf).items():  # every node sits in exactly one step's group
        inside = [g["title"] for g in groups if g["bounding"][0] <= x0 and x1 <= g["bounding"][0] + g["bounding"][2]
                  and g["bounding"][1] <= y0 and y1 <= g["bounding"][1] + g["bounding"][3]]
        assert len(inside) == 1, (path.name, node, inside)


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_note_lists_every_model_file_with_folder_and_link(path):
    wf = load(path)
    notes = [n for n in wf["nodes"] if n["type"] == "MarkdownNote"]
    assert len(notes) == 1
    text = notes[0]["widgets_values"][0]
    assert "### Model files" in text and "### Steps" in text
    for node in wf["nodes"]:
        for model in node["properties"].get("models", []):
            assert f"| `{model['name']}` | `ComfyUI/models/{model['directory']}/` | [download]({model['url']}) |" \
                in text, (path.name, model["name"])
    if any(build.MPS_FILE in n["widgets_values"] for n in wf["nodes"] if n["type"] == "WanRewardLoadRewardModel"):
        assert f"`{build.MPS_FILE}`" in text and "no download link" in text


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
        if node["type"] in build.VIRTUAL_NODES:  # frontend-only (note, reroute): no pack, no widgets to check
            assert "cnr_id" not in props
            continue
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
    best = load(WORKFLOWS / "reward_lora_best_of_n.json")
    pick = next(n for n in best["nodes"] if n["type"] == "WanRewardPickBest")
    latent_in = next(i["link"] for i in pick["inputs"] if i["name"] == "latent")
    sources = {lk[0]: lk for lk in best["links"]}
    assert next(n for n in best["nodes"] if n["id"] == sources[latent_in][1])["type"] == "KSamplerAdvanced"
    refine = [lk for lk in best["links"] if lk[1] == pick["id"] and lk[2] == 6]  # the picked latent is refined
    assert refine and next(n for n in best["nodes"] if n["id"] == refine[0][3])["type"] == "KSamplerAdvanced"
    assert next(n for n in best["nodes"] if n["type"] == "EmptyHunyuanLatentVideo")["widgets_values"][3] == 4
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
        if node["type"] in build.VIRTUAL_NODES:
            continue
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
        src, src_slot = real_source(wf, src, src_slot)
        out_type = info[nodes[src]["type"]]["output"][src_slot]
        assert kind == out_type, (path.name, link_id, kind, out_type)
        if nodes[dst]["type"] == "Reroute":
            continue
        name = nodes[dst]["inputs"][dst_slot]["name"]
        wanted = dict((n, k) for n, k, _, _ in build.input_specs(info[nodes[dst]["type"]]))[name]
        assert _compatible(out_type, wanted), (path.name, nodes[dst]["type"], name, out_type, wanted)


@pytest.mark.comfyui
def test_workflows_are_up_to_date(comfyui):
    """Rebuilding from the live /object_info gives the committed files (regenerate with
    python tools/build_workflows.py --url <ComfyUI> after a node's inputs change)."""
    info = comfyui.object_info()
    for name, make in build.WORKFLOWS.items():
        assert make(info) == load(WORKFLOWS / name), f"{name} is out of date: run tools/build_workflows.py"


# ---- (c) and (d) run with tiny models ------------------------------------------------------------

def real_source(workflow: dict, node_id: int, slot: int) -> tuple[int, int]:
    """The node and output a link really comes from, through Reroutes (as the frontend resolves them)."""
    nodes = {n["id"]: n for n in workflow["nodes"]}
    links = {link[0]: link for link in workflow["links"]}
    while nodes[node_id]["type"] == "Reroute":
        link = links[nodes[node_id]["inputs"][0]["link"]]
        node_id, slot = link[1], link[2]
    return node_id, slot


def ui_to_api(workflow: dict, info: dict) -> dict:
    """The API prompt ComfyUI's "Export (API)" would write for an active UI workflow."""
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node.get("mode", 0) in (2, 4) or node["type"] in build.VIRTUAL_NODES:
            continue
        inputs = {name: value for name, value in zip(build.widget_names(info[node["type"]]), node["widgets_values"])
                  if not name.endswith(".control") and name != "upload"}
        for inp in node["inputs"]:
            if inp["link"] is not None:
                link = links[inp["link"]]
                source, slot = real_source(workflow, link[1], link[2])
                inputs[inp["name"]] = [str(source), slot]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def _write_tiny_files(comfyui) -> None:
    """Tiny random models under the workflows' real file names (so no name is substituted)."""
    import numpy as np
    import torch
    from PIL import Image
    from safetensors.torch import save_file

    from tests.helpers.tiny_wan import linear_module_names, random_lora, tiny_wan_state_dict
    from training.rewards.tiny import write_tiny_hps_checkpoint, write_tiny_mps_checkpoint
    from training.safe_io import save_safetensors
    from training.tiny_models import tiny_vae_state_dict

    if (comfyui.input / "example.png").exists():
        return
    experts = {}
    for i, key in enumerate(("inp_high", "inp_low", "t2v_high", "t2v_low")):
        sd = tiny_wan_state_dict(seed=20 + i, **({} if key.startswith("inp") else {"in_dim": 16}))
        save_file(sd, comfyui.model_path("diffusion_models", build.MODELS[key][0]))
        experts[key] = sd
    # ComfyUI's Wan VAE has a fixed width (96), so this one is full size (random, bf16: 250 MB)
    vae = {k: v.to(torch.bfloat16) for k, v in tiny_vae_state_dict(seed=3, base_dim=96).items()}
    save_safetensors(vae, comfyui.model_path("vae", build.MODELS["vae"][0]))
    for key, expert in (("hps_high", "inp_high"), ("hps_low", "inp_low"), ("lightx2v_high", "t2v_high"),
                        ("lightx2v_low", "t2v_low")):
        lora = random_lora(experts[expert], linear_module_names(), rank=4, alpha=4.0, seed=len(key))
        tensors = {}
        for module, (up, down, alpha) in lora.items():
            base = "lora_unet__" + module.replace(".", "_")
            tensors |= {f"{base}.lora_up.weight": up, f"{base}.lora_down.weight": down,
                        f"{base}.alpha": torch.tensor(alpha)}
        save_file(tensors, comfyui.model_path("loras", build.MODELS[key][0]))
    write_tiny_hps_checkpoint(comfyui.model_path("reward_models", build.MODELS["hps"][0]), seed=0)
    write_tiny_mps_checkpoint(comfyui.model_path("reward_models", build.MPS_FILE), seed=0)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(comfyui.input / "example.png")


def tiny_prompt(comfyui, workflow: dict, run_name: str) -> dict:
    """The workflow as an API prompt on tiny models (a tiny umT5 CLIP from the probe pack), small
    frames, few steps, CPU training."""
    _write_tiny_files(comfyui)
    info = comfyui.object_info()
    prompt = ui_to_api(workflow, info)
    for node_id, node in list(prompt.items()):
        kind, inputs = node["class_type"], node["inputs"]
        if kind == "CLIPLoader":  # ComfyUI's Wan umT5 classes at a tiny size (CLIPLoader's config is xxl)
            prompt[node_id] = {"class_type": "ProbeTinyUMT5Clip", "inputs": {"seed": 0}}
        elif kind in ("EmptyHunyuanLatentVideo", "WanFunInpaintToVideo"):
            inputs.update(width=32, height=32, length=5)
        elif kind == "KSamplerAdvanced":
            inputs.update(steps=4)
            inputs.update(end_at_step=2) if inputs["start_at_step"] == 0 else inputs.update(start_at_step=2)
        elif kind == "WanRewardLoraTrain":
            assert "clip" in inputs  # the prompts are encoded by the node with the graph's CLIP
            inputs.update(steps=2, rank=4, alpha=4.0, width=32, height=32,
                          frames=5, gpus="cpu:2", deepspeed="none", inference_steps=8, guidance_scale=3.0,
                          checkpoint_every=0, output_name=run_name, resume=False)
    return prompt


@pytest.mark.comfyui
def test_score_and_compare_runs_with_tiny_models(comfyui):
    workflow = load(WORKFLOWS / "reward_lora_score_and_compare.json")
    outputs = comfyui.run(tiny_prompt(comfyui, workflow, "unused"), timeout=600)
    by_type = {}
    for node_id, out in outputs.items():
        by_type.setdefault(next(n["type"] for n in workflow["nodes"] if str(n["id"]) == node_id), []).append(out)
    assert len(by_type["WanRewardScoreFrames"]) == 22
    sheet = by_type["SaveImage"][0]["images"][0]
    assert (comfyui.output / sheet["subfolder"] / sheet["filename"]).is_file()
    cells = json.loads(by_type["PreviewAny"][0]["text"][0])
    assert len(cells) == 18 and {(c["high"], c["low"]) for c in cells} == {
        (h, lo) for h in (0.0, 0.5, 1.0) for lo in (0.0, 0.5, 1.0)}
    assert {c["model"] for c in cells} == {"hps", "mps"}
    by_cell = {(c["high"], c["low"], c["model"]): c["scores"] for c in cells}
    # different strengths give different videos, hence different scores
    hps = [by_cell[(h, lo, "hps")]["mean"] for h in (0.0, 0.5, 1.0) for lo in (0.0, 0.5, 1.0)]
    assert len({round(v, 6) for v in hps}) > 1
    # strength 0 on both experts samples the base model: the grid's corner scores as the A/B baseline,
    # and strength 1/1 as the A/B "with reward LoRAs" side
    text = {n.get("title"): outputs[str(n["id"])]["text"][0] for n in workflow["nodes"]
            if n["type"] == "WanRewardScoreFrames"}
    assert text["HPS v2.1: without reward LoRAs"] == text["HPS v2.1: high 0.0 / low 0.0"]
    assert text["MPS: with reward LoRAs"] == text["MPS: high 1.0 / low 1.0"]
    assert text["HPS v2.1: with reward LoRAs"] != text["HPS v2.1: without reward LoRAs"]
    assert "motion" in json.dumps(by_cell[(1.0, 1.0, "mps")])
    assert by_type["SaveVideo"], "the side-by-side video was not saved"


@pytest.mark.comfyui
def test_train_and_preview_runs_with_tiny_models(comfyui):
    workflow = load(WORKFLOWS / "reward_lora_train_and_preview.json")
    outputs = comfyui.run(tiny_prompt(comfyui, workflow, "tiny_workflow_d"), timeout=600)
    texts = [t for out in outputs.values() for t in out.get("text", [])]
    report = next(t for t in texts if "keys unmatched" in t)
    assert "keys unmatched: 0;" in report and "modules matched: 0 of" not in report, report
    scores = json.loads(next(t for t in texts if '"reason"' in t))
    assert scores["steps"] == 2 and scores["reason"] == "completed"
    assert (comfyui.models / "loras" / "tiny_workflow_d.safetensors").is_file()
    assert any("images" in out for out in outputs.values())  # reward curve preview / video


@pytest.mark.comfyui
@pytest.mark.parametrize("name", ["wan22_fun_inp_reward_lora.json", "wan22_t2v_reward_lora.json",
                                  "wan22_t2v_lightx2v_reward_lora_stack.json", "reward_lora_best_of_n.json"])
def test_generation_workflows_run_with_tiny_models(comfyui, name):
    workflow = load(WORKFLOWS / name)
    outputs = comfyui.run(tiny_prompt(comfyui, workflow, "unused"), timeout=300,
                          extra_data={"extra_pnginfo": {"workflow": workflow}})
    if name == "reward_lora_best_of_n.json":  # 4 candidates scored, the best one's latent refined and saved
        pick = next(str(n["id"]) for n in workflow["nodes"] if n["type"] == "WanRewardPickBest")
        report = json.loads(next(out["text"][0] for out in outputs.values()
                                 if out.get("text") and '"pick"' in out["text"][0]))
        assert [c["input"] for c in report["candidates"]] == [f"candidate_1[video {i}]" for i in range(4)]
        assert outputs[pick]["text"][0].startswith(f"best: index {report['pick']['best']} ")
        saved = next(out["images"][0] for node_id, out in outputs.items()
                     if next(n["type"] for n in workflow["nodes"] if str(n["id"]) == node_id) == "SaveImage")
        from PIL import Image

        with Image.open(comfyui.output / saved["subfolder"] / saved["filename"]) as image:
            assert json.loads(image.info["wan_reward_selection"])[pick]["best_index"] == report["pick"]["best"]
    loader = next(str(n["id"]) for n in workflow["nodes"] if n["type"] == "WanRewardDualLoraLoader")
    save = next(str(n["id"]) for n in workflow["nodes"] if n["type"] == "SaveVideo")
    report = outputs[loader]["text"][0]  # the loader's report on the node: the tiny LoRAs applied fully
    assert "keys unmatched: 0;" in report and "modules matched: 0 of" not in report, report
    video = outputs[save]["images"][0]
    path = comfyui.output / video["subfolder"] / video["filename"]
    assert path.is_file() and path.stat().st_size > 0
