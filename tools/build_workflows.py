"""Write the example workflows (ComfyUI UI format 0.4) of ``workflows/`` from compact descriptions.

    python tools/build_workflows.py --object-info object_info.json   # or --url http://127.0.0.1:8188

Widget orders come from a live ``/object_info`` (the pack must be loaded), so widgets_values
follow each node's real input order, with the extra control_after_generate value after seeds.
Each workflow reads left to right: one group per step ("Step 1 - Load models", ...), laid out
in columns with no node over another, and a Markdown note with its model files, their folders
and download links. The JSON files are committed; tests/test_workflows_shipped.py checks them against
/object_info, and tests/test_comfyui_browser.py loads them in the real frontend (no missing node, no
overlap) and renders the same-name .jpg thumbnails.
"""

from __future__ import annotations

import argparse
import functools
import json
import uuid
from pathlib import Path
from typing import NamedTuple

WORKFLOW_DIR = Path(__file__).resolve().parents[1] / "workflows"
PACK = "wan-reward-lora"
PACK_VERSION = "0.1.0"
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}

HF_WAN22 = "https://huggingface.co/Comfy-Org/Wan_2.2_ComfyUI_Repackaged/resolve/main/split_files"
HF_WAN21 = "https://huggingface.co/Comfy-Org/Wan_2.1_ComfyUI_repackaged/resolve/main/split_files"
HF_REWARD = "https://huggingface.co/alibaba-pai/Wan2.2-Fun-Reward-LoRAs/resolve/main"
MODELS = {
    "umt5": ("umt5_xxl_fp8_e4m3fn_scaled.safetensors", f"{HF_WAN21}/text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors", "text_encoders"),
    "vae": ("wan_2.1_vae.safetensors", f"{HF_WAN22}/vae/wan_2.1_vae.safetensors", "vae"),
    "inp_high": ("wan2.2_fun_inpaint_high_noise_14B_fp8_scaled.safetensors",
                 f"{HF_WAN22}/diffusion_models/wan2.2_fun_inpaint_high_noise_14B_fp8_scaled.safetensors", "diffusion_models"),
    "inp_low": ("wan2.2_fun_inpaint_low_noise_14B_fp8_scaled.safetensors",
                f"{HF_WAN22}/diffusion_models/wan2.2_fun_inpaint_low_noise_14B_fp8_scaled.safetensors", "diffusion_models"),
    "t2v_high": ("wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors",
                 f"{HF_WAN22}/diffusion_models/wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors", "diffusion_models"),
    "t2v_low": ("wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors",
                f"{HF_WAN22}/diffusion_models/wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors", "diffusion_models"),
    "hps_high": ("Wan2.2-Fun-A14B-InP-high-noise-HPS2.1.safetensors",
                 f"{HF_REWARD}/Wan2.2-Fun-A14B-InP-high-noise-HPS2.1.safetensors", "loras"),
    "hps_low": ("Wan2.2-Fun-A14B-InP-low-noise-HPS2.1.safetensors",
                f"{HF_REWARD}/Wan2.2-Fun-A14B-InP-low-noise-HPS2.1.safetensors", "loras"),
    "lightx2v_high": ("wan2.2_t2v_lightx2v_4steps_lora_v1.1_high_noise.safetensors",
                      f"{HF_WAN22}/loras/wan2.2_t2v_lightx2v_4steps_lora_v1.1_high_noise.safetensors", "loras"),
    "lightx2v_low": ("wan2.2_t2v_lightx2v_4steps_lora_v1.1_low_noise.safetensors",
                     f"{HF_WAN22}/loras/wan2.2_t2v_lightx2v_4steps_lora_v1.1_low_noise.safetensors", "loras"),
    "hps": ("HPS_v2.1_compressed.pt", "https://huggingface.co/xswu/HPSv2/resolve/main/HPS_v2.1_compressed.pt",
            "reward_models"),
}
# MPS (Kwai-Kolors/MPS) states no licence: users download it themselves, so it has no url here.
MPS_FILE = "MPS_overall_checkpoint.pth"
NEGATIVE = ("色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，"
            "丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，"
            "杂乱的背景，三条腿，背景人很多，倒着走")
PROMPT = ("A red fox trots through fresh snow in a pine forest at golden hour, its breath visible in the cold air, "
          "the camera tracking beside it at ground level.")


def has_control(name: str, opts: dict) -> bool:
    """The frontend adds a control_after_generate widget when asked, and by default to seed/noise_seed."""
    return bool(opts.get("control_after_generate", name in ("seed", "noise_seed")))


def _widget_spec(spec) -> tuple[bool, dict]:
    kind, opts = spec[0], (spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})
    is_widget = (isinstance(kind, list) or kind in WIDGET_TYPES) and not opts.get("forceInput")
    return is_widget, opts


def input_specs(info: dict) -> list[tuple[str, object, dict, bool]]:
    """(name, type, options, is_widget) of a node's inputs in the frontend's order."""
    order = info.get("input_order") or {k: list(info["input"].get(k, {})) for k in ("required", "optional")}
    out = []
    for group in ("required", "optional"):
        for name in order.get(group, []):
            spec = info["input"][group][name]
            is_widget, opts = _widget_spec(spec)
            kind = "COMBO" if isinstance(spec[0], list) else spec[0]
            out.append((name, kind, opts, is_widget))
    return out


def widget_names(info: dict) -> list[str]:
    """Names of widgets_values entries in order ("<seed>.control" marks the control_after_generate value)."""
    names = []
    for name, _, opts, is_widget in input_specs(info):
        if is_widget:
            names.append(name)
            if has_control(name, opts):
                names.append(f"{name}.control")
            if opts.get("image_upload"):
                names.append("upload")
    return names


# Frontend-only nodes (not in /object_info; the frontend drops them when it queues a prompt).
VIRTUAL_NODES = ("MarkdownNote", "Note", "Reroute")
TITLE_HEIGHT = 30  # LiteGraph draws a node's title bar above its pos
NODE_GAP = 40      # between a node and the title bar of the next one below it
COLUMN_GAP = 40
STAGE_GAP = 90
GROUP_PAD, GROUP_TITLE = 15, 50
FIXED_SIZES = {"PreviewImage": [420, 360], "SaveImage": [460, 420], "SaveVideo": [460, 420],
               "PreviewAny": [420, 260], "Reroute": [90, 26]}


def estimated_size(info: dict) -> list[int]:
    """A size at least the frontend's own (computeSize: slots, widgets, a multiline text or an image
    upload) so that the layout below holds as the frontend draws it (the browser test checks)."""
    specs = input_specs(info)
    slots = max(sum(1 for *_, is_widget in specs if not is_widget), len(info["output"]))
    widgets = sum(1 + has_control(name, opts) for name, _, opts, is_widget in specs if is_widget)
    multiline = sum(1 for _, kind, opts, is_widget in specs if is_widget and kind == "STRING" and opts.get("multiline"))
    upload = sum(1 for _, _, opts, is_widget in specs if is_widget and opts.get("image_upload"))
    return [380, 40 + 22 * slots + 28 * widgets + 120 * multiline + 260 * upload]


class Graph:
    """Nodes, links and groups of one workflow. Nodes are added to steps (``stage``): each step is a
    group of columns (``column`` starts the next one), steps run left to right, nodes stack down a
    column; ``to_json`` places them so that no node box (title bar included) overlaps another."""

    def __init__(self, object_info: dict, title: str):
        self.info = object_info
        self.title = title
        self.nodes: list[dict] = []
        self.links: list[list] = []
        self.groups: list[dict] = []
        self.stages: list[dict] = []

    def stage(self, title: str, color: str = "#3f789e") -> None:
        self.stages.append({"title": title, "color": color, "columns": [[]]})

    def column(self) -> None:
        self.stages[-1]["columns"].append([])

    def _add(self, node: dict) -> dict:
        node.update(id=len(self.nodes) + 1, order=len(self.nodes), pos=[0, 0], flags={})
        self.nodes.append(node)
        self.stages[-1]["columns"][-1].append(node)
        return node

    def node(self, type_: str, widgets: dict | None = None, title: str | None = None,
             models: list[str] | None = None, size=None, mode: int = 0) -> dict:
        if type_ not in self.info:
            raise KeyError(f"{type_} is not in /object_info")
        info = self.info[type_]
        widgets = dict(widgets or {})
        values = []
        for name, kind, opts, is_widget in input_specs(info):
            if not is_widget:
                continue
            if name in widgets:
                value = widgets.pop(name)
            elif "default" in opts:
                value = opts["default"]
            elif kind == "COMBO":
                options = opts.get("options") or (info["input"].get("required", {}).get(name)
                                                  or info["input"].get("optional", {}).get(name))[0]
                value = options[0] if options else ""
            else:
                value = {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}[kind]
            values.append(value)
            if has_control(name, opts):
                values.append(widgets.pop(f"{name}.control", "fixed"))
            if opts.get("image_upload"):
                values.append(widgets.pop("upload", "image"))  # the upload button's value
        if widgets:
            raise KeyError(f"{type_}: no widget named {sorted(widgets)}")
        inputs = [{"name": name, "type": kind, "link": None}
                  for name, kind, _, is_widget in input_specs(info) if not is_widget]
        outputs = [{"name": info["output_name"][i], "type": t if isinstance(t, str) else "COMBO", "links": [],
                    "slot_index": i} for i, t in enumerate(info["output"])]
        ours = info.get("python_module", "").startswith("custom_nodes")
        properties = {"Node name for S&R": type_, "cnr_id": PACK if ours else "comfy-core",
                      "ver": PACK_VERSION if ours else "0.3.64"}
        if models:
            properties["models"] = [{"name": MODELS[m][0], "url": MODELS[m][1], "directory": MODELS[m][2]}
                                    for m in models]
        estimate = list(FIXED_SIZES.get(type_) or estimated_size(info))
        estimate[0] = max(estimate[0], 8 * len(title or type_) + 60)  # the frontend widens a node to its title
        node = {"type": type_, "size": [max(a, b) for a, b in zip(size or estimate, estimate)], "mode": mode,
                "inputs": inputs, "outputs": outputs, "properties": properties, "widgets_values": values}
        if title:
            node["title"] = title
        return self._add(node)

    def note(self, markdown: str, size=(420, 520)) -> dict:
        """A MarkdownNote (frontend-only, as in Comfy-Org's templates)."""
        return self._add({"type": "MarkdownNote", "size": list(size), "mode": 0, "inputs": [], "outputs": [],
                          "properties": {}, "widgets_values": [markdown], "color": "#432", "bgcolor": "#653"})

    def reroute(self, src: dict, output: int | str) -> dict:
        """A Reroute (frontend-only) carrying ``src``'s output into the current step, so the links of
        a step start inside it."""
        slot = output if isinstance(output, int) else self.info[src["type"]]["output_name"].index(output)
        kind = src["outputs"][slot]["type"]
        node = self._add({"type": "Reroute", "size": list(FIXED_SIZES["Reroute"]), "mode": 0,
                          "inputs": [{"name": "", "type": "*", "link": None}],
                          "outputs": [{"name": "", "type": kind, "links": [], "slot_index": 0}],
                          "properties": {"showOutputText": False, "horizontal": False}, "widgets_values": []})
        self.link(src, slot, node, "")
        return node

    def link(self, src: dict, output: int | str, dst: dict, input_name: str) -> None:
        slot = output if isinstance(output, int) else self.info[src["type"]]["output_name"].index(output)
        kind = src["outputs"][slot]["type"]
        link_id = len(self.links) + 1
        for i, inp in enumerate(dst["inputs"]):
            if inp["name"] == input_name:
                inp["link"] = link_id
                target = i
                break
        else:  # a widget input fed by a link: the frontend lists it with its widget
            spec = next(s for s in input_specs(self.info[dst["type"]]) if s[0] == input_name)
            dst["inputs"].append({"name": input_name, "type": spec[1], "widget": {"name": input_name},
                                  "link": link_id})
            target = len(dst["inputs"]) - 1
        src["outputs"][slot]["links"].append(link_id)
        self.links.append([link_id, src["id"], slot, dst["id"], target, kind])

    def layout(self) -> None:
        """Steps left to right, their columns left to right, nodes down each column; one group per step."""
        x = 0
        self.groups = []
        for number, stage in enumerate(self.stages, 1):
            left = x
            for column in stage["columns"]:
                y = 0
                for node in column:
                    node["pos"] = [x, y + TITLE_HEIGHT]
                    y += TITLE_HEIGHT + node["size"][1] + NODE_GAP
                x += max((n["size"][0] for n in column), default=0) + COLUMN_GAP
            right = x - COLUMN_GAP
            bottom = max(n["pos"][1] + n["size"][1] for c in stage["columns"] for n in c)
            self.groups.append({"id": number, "title": stage["title"], "color": stage["color"], "font_size": 24,
                                "bounding": [left - GROUP_PAD, -GROUP_TITLE, right - left + 2 * GROUP_PAD,
                                             bottom + GROUP_TITLE + GROUP_PAD], "flags": {}})
            x = right + STAGE_GAP

    def to_json(self) -> dict:
        self.layout()
        return {"id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"{PACK}/{self.title}")), "revision": 0,
                "last_node_id": len(self.nodes), "last_link_id": len(self.links), "nodes": self.nodes,
                "links": self.links, "groups": self.groups, "config": {},
                "extra": {"ds": {"scale": 0.5, "offset": [60, 80]}, "frontendVersion": "1.27.10",
                          "info": {"title": self.title}},
                "version": 0.4}


def model_note(title: str, what: str, models: list[str], steps: list[str], extra: str = "") -> str:
    """The workflow's Markdown note: what it does, its model files (folder, download link), its steps."""
    rows = []
    for key in dict.fromkeys(models):
        name, url, folder = MODELS[key] if key in MODELS else (MPS_FILE, "", "reward_models")
        link = f"[download]({url})" if url else "no download link: see the README (no stated licence)"
        rows.append(f"| `{name}` | `ComfyUI/models/{folder}/` | {link} |")
    return "\n".join([f"## {title}", "", what, "", "### Model files", "", "| file | folder | source |",
                      "|---|---|---|", *rows, "", "### Steps", "", *[f"{i}. {s}" for i, s in enumerate(steps, 1)],
                      *(["", extra] if extra else [])])


# ---- shared pieces --------------------------------------------------------------------------

def text_encoder(g: Graph):
    return g.node("CLIPLoader", {"clip_name": MODELS["umt5"][0], "type": "wan", "device": "default"},
                  models=["umt5"])


def vae_loader(g: Graph):
    return g.node("VAELoader", {"vae_name": MODELS["vae"][0]}, models=["vae"])


def prompts(g: Graph, clip, prompt: str = PROMPT):
    pos = g.node("CLIPTextEncode", {"text": prompt}, title="Positive prompt", size=[420, 220])
    neg = g.node("CLIPTextEncode", {"text": NEGATIVE}, title="Negative prompt", size=[420, 220])
    g.link(clip, 0, pos, "clip")
    g.link(clip, 0, neg, "clip")
    return pos, neg


def experts(g: Graph, high: str, low: str):
    uh = g.node("UNETLoader", {"unet_name": MODELS[high][0], "weight_dtype": "default"},
                title="High-noise expert", models=[high])
    ul = g.node("UNETLoader", {"unet_name": MODELS[low][0], "weight_dtype": "default"},
                title="Low-noise expert", models=[low])
    return uh, ul


def lightx2v_loras(g: Graph, uh, ul):
    """The lightx2v 4-step distill LoRAs (core's LoraLoaderModelOnly), one per expert."""
    lh = g.node("LoraLoaderModelOnly", {"lora_name": MODELS["lightx2v_high"][0], "strength_model": 1.0},
                title="lightx2v 4-step (high)", models=["lightx2v_high"])
    ll = g.node("LoraLoaderModelOnly", {"lora_name": MODELS["lightx2v_low"][0], "strength_model": 1.0},
                title="lightx2v 4-step (low)", models=["lightx2v_low"])
    g.link(uh, 0, lh, "model")
    g.link(ul, 0, ll, "model")
    return lh, ll


def reward_loras(g: Graph, model_high, model_low, strength_high=0.5, strength_low=0.5,
                 title="Reward LoRAs (HPS2.1, both experts)"):
    loader = g.node("WanRewardDualLoraLoader", {
        "lora_high": MODELS["hps_high"][0], "strength_high": strength_high,
        "lora_low": MODELS["hps_low"][0], "strength_low": strength_low}, title=title,
        models=["hps_high", "hps_low"])
    g.link(model_high[0], model_high[1], loader, "model_high")
    g.link(model_low[0], model_low[1], loader, "model_low")
    return loader


def shifts(g: Graph, model_high, model_low, shift: float):
    """ModelSamplingSD3 on both experts (as ComfyUI's Wan2.2 templates)."""
    sh = g.node("ModelSamplingSD3", {"shift": shift}, title="Shift (high)")
    sl = g.node("ModelSamplingSD3", {"shift": shift}, title="Shift (low)")
    g.link(model_high[0], model_high[1], sh, "model")
    g.link(model_low[0], model_low[1], sl, "model")
    return sh, sl


def two_samplers(g: Graph, sh, sl, pos, neg, latent, steps: int, cfg: float, split: int, seed: int = 42,
                 control: str = "fixed", stack: bool = True):
    """Two KSamplerAdvanced split at ``split`` (as ComfyUI's templates); ``stack`` False puts the low
    one in the next column."""
    k1 = g.node("KSamplerAdvanced", {
        "add_noise": "enable", "noise_seed": seed, "noise_seed.control": control, "steps": steps, "cfg": cfg,
        "sampler_name": "euler", "scheduler": "simple", "start_at_step": 0, "end_at_step": split,
        "return_with_leftover_noise": "enable"}, title="KSampler (high noise)")
    if not stack:
        g.column()
    k2 = g.node("KSamplerAdvanced", {
        "add_noise": "disable", "noise_seed": 0, "noise_seed.control": "fixed", "steps": steps, "cfg": cfg,
        "sampler_name": "euler", "scheduler": "simple", "start_at_step": split, "end_at_step": 10000,
        "return_with_leftover_noise": "disable"}, title="KSampler (low noise)")
    g.link(sh, 0, k1, "model")
    g.link(sl, 0, k2, "model")
    for k in (k1, k2):
        g.link(pos[0], pos[1], k, "positive")
        g.link(neg[0], neg[1], k, "negative")
    g.link(latent[0], latent[1], k1, "latent_image")
    g.link(k1, 0, k2, "latent_image")
    return k2


def decode_and_save(g: Graph, samples, vae, prefix: str):
    dec = g.node("VAEDecode")
    g.link(samples, 0, dec, "samples")
    g.link(vae, 0, dec, "vae")
    video = g.node("CreateVideo", {"fps": 16})
    g.link(dec, 0, video, "images")
    save = g.node("SaveVideo", {"filename_prefix": prefix, "format": "auto", "codec": "auto"})
    g.link(video, 0, save, "video")
    return dec


# ---- the workflows ----------------------------------------------------------------------------

class VideoWorkflow(NamedTuple):
    """One of the reward-LoRA video workflows: image- (Fun InP) or text-to-video, optionally with the
    lightx2v 4-step LoRAs under the reward LoRAs, and its sampling settings."""

    title: str
    high: str  # MODELS keys of the experts
    low: str
    prefix: str  # SaveVideo filename prefix
    what: str
    image_to_video: bool = False
    lightx2v: bool = False
    shift: float = 8.0
    steps: int = 20
    cfg: float = 3.5
    split: int = 10


def reward_lora_video(info: dict, spec: VideoWorkflow) -> dict:
    g = Graph(info, spec.title)
    models = ["umt5", "vae", spec.high, spec.low, "hps_high", "hps_low"]
    models += ["lightx2v_high", "lightx2v_low"] if spec.lightx2v else []
    steps = ["Load models: the two experts, umT5, the VAE (files in the note's table).",
             "Reward LoRAs: the HPS2.1 pair on both experts (strength 0.5; 0.5-0.7 is the usual start)."
             + (" Under them the lightx2v 4-step LoRAs." if spec.lightx2v else ""),
             "Prompt: what the video shows.",
             "Video size: " + ("the start image, size and length." if spec.image_to_video else "size and length."),
             f"Sample: {spec.steps} steps, cfg {spec.cfg:g}, shift {spec.shift:g}; high noise for steps 0-{spec.split}, "
             "low noise for the rest.",
             "Decode and save the video."]
    g.stage("Step 1 - Load models")
    g.note(model_note(spec.title, spec.what, models, steps))
    g.column()
    clip = text_encoder(g)
    vae = vae_loader(g)
    uh, ul = experts(g, spec.high, spec.low)
    g.stage("Step 2 - Reward LoRAs", color="#a1309b")
    if spec.lightx2v:  # reward LoRAs stacked on the lightx2v 4-step distill LoRAs
        lh, ll = lightx2v_loras(g, uh, ul)
        loras = reward_loras(g, (lh, 0), (ll, 0), 0.5, 0.5, title="Reward LoRAs on top (HPS2.1)")
    else:
        loras = reward_loras(g, (uh, 0), (ul, 0))
    g.stage("Step 3 - Prompt")
    pos, neg = prompts(g, clip)
    g.stage("Step 4 - Video size")
    if spec.image_to_video:
        start = g.node("LoadImage", {"image": "example.png", "upload": "image"}, title="Start image")
        inp = g.node("WanFunInpaintToVideo", {"width": 640, "height": 640, "length": 81, "batch_size": 1})
        g.link(pos, 0, inp, "positive")
        g.link(neg, 0, inp, "negative")
        g.link(vae, 0, inp, "vae")
        g.link(start, 0, inp, "start_image")
        positive, negative, latent = (inp, 0), (inp, 1), (inp, 2)
    else:
        empty = g.node("EmptyHunyuanLatentVideo", {"width": 640, "height": 640, "length": 81, "batch_size": 1})
        positive, negative, latent = (pos, 0), (neg, 0), (empty, 0)
    g.stage("Step 5 - Sample (high noise, then low noise)", color="#b06634")
    sh, sl = shifts(g, (loras, 0), (loras, 1), spec.shift)
    g.column()
    out = two_samplers(g, sh, sl, positive, negative, latent, steps=spec.steps, cfg=spec.cfg, split=spec.split,
                       control="randomize", stack=False)
    g.stage("Step 6 - Decode and save", color="#3f8f5f")
    decode_and_save(g, out, vae, spec.prefix)
    return g.to_json()


VIDEO_WORKFLOWS = {
    "wan22_fun_inp_reward_lora.json": VideoWorkflow(
        "Wan2.2-Fun-A14B-InP + HPS2.1 reward LoRAs", "inp_high", "inp_low", "video/wan22_fun_inp_reward_lora",
        "Image to video with Wan2.2-Fun-A14B-InP and the official HPS2.1 reward LoRAs on both experts.",
        image_to_video=True),
    "wan22_t2v_reward_lora.json": VideoWorkflow(
        "Wan2.2 T2V A14B + HPS2.1 reward LoRAs", "t2v_high", "t2v_low", "video/wan22_t2v_reward_lora",
        "Text to video with the Wan2.2 T2V A14B experts and the HPS2.1 reward LoRAs. An experiment: the reward "
        "LoRAs were trained on Wan2.2-Fun-A14B-InP; judge the result (e.g. with the score-and-compare workflow)."),
    "wan22_t2v_lightx2v_reward_lora_stack.json": VideoWorkflow(
        "Wan2.2 T2V A14B: lightx2v 4-step + HPS2.1 reward LoRAs stacked", "t2v_high", "t2v_low",
        "video/wan22_t2v_lightx2v_reward_lora",
        "Text to video in 4 steps: the lightx2v distill LoRAs with the HPS2.1 reward LoRAs stacked on top "
        "(an experiment on the T2V experts, as the row above).", lightx2v=True, shift=5.0, steps=4, cfg=1.0, split=2),
}


def _scores(g: Graph, frames, hps, mps, prompt: str, title: str):
    """HPS v2.1 and MPS scores (each node also reports motion) of one decoded video."""
    sh = g.node("WanRewardScoreFrames", {"prompt": prompt, "frames": "evenly_spaced", "n": 8},
                title=f"HPS v2.1: {title}")
    sm = g.node("WanRewardScoreFrames", {"prompt": prompt, "frames": "evenly_spaced", "n": 8},
                title=f"MPS: {title}")
    for node, model in ((sh, hps), (sm, mps)):
        g.link(model, 0, node, "reward_model")
        g.link(frames, 0, node, "images")
    return sh, sm


def score_and_compare(info: dict) -> dict:
    """One seed with and without reward LoRAs side by side, scored; and a 3x3 strength grid."""
    g = Graph(info, "Score and compare: with/without reward LoRAs, strength grid")
    g.stage("Step 1 - Load models")
    g.note(model_note(
        "Score and compare", "The same seed without and with the HPS2.1 reward LoRAs, side by side and scored with "
        "HPS v2.1 and MPS (each score node also reports motion); then a strength grid (high 0 / 0.5 / 1 x low "
        "0 / 0.5 / 1): first frames into a contact sheet and every cell's scores into one JSON text. It samples 11 "
        "videos: expect a long run.", ["umt5", "vae", "t2v_high", "t2v_low", "hps_high", "hps_low", "hps", "mps"],
        ["Load models and the two reward models.", "Prompt and video size (shared by every video).",
         "Without / with the reward LoRAs (the same seed).", "Decode and score both.", "Side by side video.",
         "Strength grid: each cell samples, decodes and scores.", "Contact sheet and the scores JSON."]))
    g.column()
    clip = text_encoder(g)
    vae = vae_loader(g)
    uh, ul = experts(g, "t2v_high", "t2v_low")
    g.column()
    hps = g.node("WanRewardLoadRewardModel", {"model_name": MODELS["hps"][0]}, models=["hps"], title="HPS v2.1")
    mps = g.node("WanRewardLoadRewardModel", {"model_name": MPS_FILE}, title="MPS (download it yourself)")
    g.stage("Step 2 - Prompt and video size")
    pos, neg = prompts(g, clip)
    latent = g.node("EmptyHunyuanLatentVideo", {"width": 480, "height": 480, "length": 33, "batch_size": 1})
    sampling = dict(steps=20, cfg=3.5, split=10, seed=42, control="fixed")
    g.stage("Step 3 - Sample without and with the reward LoRAs", color="#b06634")
    base_sh, base_sl = shifts(g, (uh, 0), (ul, 0), 8.0)
    loras = reward_loras(g, (uh, 0), (ul, 0), 1.0, 1.0)
    g.column()
    base = two_samplers(g, base_sh, base_sl, (pos, 0), (neg, 0), (latent, 0), **sampling)
    g.column()
    sh, sl = shifts(g, (loras, 0), (loras, 1), 8.0)
    g.column()
    reward = two_samplers(g, sh, sl, (pos, 0), (neg, 0), (latent, 0), **sampling)
    g.stage("Step 4 - Decode and score both", color="#3f8f5f")
    decoded = []
    for i, (samples, name) in enumerate(((base, "without reward LoRAs"), (reward, "with reward LoRAs"))):
        if i:
            g.column()
        dec = g.node("VAEDecode", title=f"Decode: {name}")
        g.link(samples, 0, dec, "samples")
        g.link(vae, 0, dec, "vae")
        _scores(g, dec, hps, mps, PROMPT, name)
        decoded.append(dec)
    g.stage("Step 5 - Side by side: without | with")
    side = g.node("ImageStitch", {"direction": "right", "match_image_size": True, "spacing_width": 8,
                                  "spacing_color": "white"}, title="Side by side: without | with")
    g.link(decoded[0], 0, side, "image1")
    g.link(decoded[1], 0, side, "image2")
    video = g.node("CreateVideo", {"fps": 16})
    g.link(side, 0, video, "images")
    save = g.node("SaveVideo", {"filename_prefix": "video/reward_lora_ab"})
    g.link(video, 0, save, "video")
    # Strength grid: high 0/0.5/1 (rows) x low 0/0.5/1 (columns), first frame of each into a contact sheet;
    # the shared inputs enter the step through reroutes, so the cells' links start inside it
    g.stage("Step 6 - Strength grid: sample, decode and score each cell", color="#a1309b")
    shared = {name: g.reroute(src, 0) for name, src in (("high", uh), ("low", ul), ("pos", pos), ("neg", neg),
                                                          ("latent", latent), ("vae", vae), ("hps", hps),
                                                          ("mps", mps))}
    strengths = (0.0, 0.5, 1.0)
    rows, report = [], None
    for r, s_high in enumerate(strengths):
        row = None
        for c, s_low in enumerate(strengths):
            g.column()
            cell = f"high {s_high} / low {s_low}"
            lo = reward_loras(g, (shared["high"], 0), (shared["low"], 0), s_high, s_low,
                              title=f"Reward LoRAs {cell}")
            csh, csl = shifts(g, (lo, 0), (lo, 1), 8.0)
            out = two_samplers(g, csh, csl, (shared["pos"], 0), (shared["neg"], 0), (shared["latent"], 0),
                               **sampling)
            dec = g.node("VAEDecode", title=f"Decode {cell}")
            g.link(out, 0, dec, "samples")
            g.link(shared["vae"], 0, dec, "vae")
            s_h, s_m = _scores(g, dec, shared["hps"], shared["mps"], PROMPT, cell)
            for score, model in ((s_h, "hps"), (s_m, "mps")):
                # one JSON list of {"cell", "high", "low", "model", "scores"}: the labels ride in the delimiter
                label = f'{{"cell": "{cell}", "high": {s_high}, "low": {s_low}, "model": "{model}", "scores": '
                if report is None:
                    joined = g.node("StringConcatenate", {"string_a": "[" + label, "delimiter": ""},
                                    title="JSON: first cell")
                    g.link(score, 1, joined, "string_b")
                else:
                    joined = g.node("StringConcatenate", {"delimiter": "},\n" + label},
                                    title=f"JSON + {cell} {model}")
                    g.link(report, 0, joined, "string_a")
                    g.link(score, 1, joined, "string_b")
                report = joined
            frame = g.node("ImageFromBatch", {"batch_index": 0, "length": 1}, title=f"First frame {cell}")
            g.link(dec, 0, frame, "image")
            if row is None:
                row = frame
            else:
                stitched = g.node("ImageStitch", {"direction": "right", "match_image_size": True, "spacing_width": 8,
                                                  "spacing_color": "white"}, title=f"Row high {s_high}: + low {s_low}")
                g.link(row, 0, stitched, "image1")
                g.link(frame, 0, stitched, "image2")
                row = stitched
        rows.append(row)
    g.stage("Step 7 - Contact sheet and scores JSON", color="#3f8f5f")
    sheet = rows[0]
    for row in rows[1:]:
        down = g.node("ImageStitch", {"direction": "down", "match_image_size": True, "spacing_width": 8,
                                      "spacing_color": "white"},
                      title="Contact sheet: + next row (high 0 / 0.5 / 1 down)")
        g.link(sheet, 0, down, "image1")
        g.link(row, 0, down, "image2")
        sheet = down
    save_sheet = g.node("SaveImage", {"filename_prefix": "reward_lora_strength_grid"})
    g.link(sheet, 0, save_sheet, "images")
    g.column()
    closed = g.node("StringConcatenate", {"string_b": "}]", "delimiter": ""}, title="JSON: close")
    g.link(report, 0, closed, "string_a")
    scores_json = g.node("PreviewAny", title="Scores JSON (every cell, HPS and MPS)")
    g.link(closed, 0, scores_json, "source")
    return g.to_json()


def train_then_preview(info: dict) -> dict:
    """Train a reward LoRA for the low-noise expert, then load it and preview a short video."""
    g = Graph(info, "Train a reward LoRA, then load it and preview")
    g.stage("Step 1 - Load the text encoder and VAE")
    g.note(model_note(
        "Train a reward LoRA, then preview it", "Reward LoRA Train runs the reward-backprop trainer (accelerate + "
        "DeepSpeed) for the low-noise expert with HPS v2.1; the trained LoRA is then loaded by the Dual LoRA Loader "
        "(its lora_low is linked to the trainer's lora_name) for a short preview video. The reward curve and the "
        "final scores are shown.", ["umt5", "vae", "inp_high", "inp_low", "hps"],
        ["Load umT5 (it encodes the training prompts once) and the VAE.", "Prompt of the preview.",
         "Train: the expert files, reward model and settings are on the node (recipe 'recommended'; memory "
         "'auto' picks fast, sharded or low from your GPUs); the options node validates on held-out prompts, "
         "keeps the best LoRA and shows sample frames while it trains.", "Load the trained LoRA.",
         "Preview: sample a short video with it, decode and save."]))
    g.column()
    clip = text_encoder(g)
    vae = vae_loader(g)
    g.stage("Step 2 - Preview prompt")
    pos, neg = prompts(g, clip)
    g.stage("Step 3 - Train (low-noise expert)", color="#a1309b")
    options = g.node("WanRewardLoraTrainOptions", {
        "validation_prompts": "\n".join([
            "A lighthouse on a rocky coast at dawn, waves breaking against the rocks.",
            "A bowl of fresh fruit on a wooden kitchen table, soft window light."]),
        "validation_every": 100, "held_out_reward": "none", "gaming_guard": "warn", "gaming_patience": 2,
        "sample_every": 100, "average_last_checkpoints": 0, "motion_weight": 0.0},
        title="Guards: validation, gaming guard, samples")
    g.column()
    train = g.node("WanRewardLoraTrain", {
        "high_noise_model": MODELS["inp_high"][0], "low_noise_model": MODELS["inp_low"][0],
        "vae": MODELS["vae"][0], "reward_model": MODELS["hps"][0], "reward_weight": 1.0,
        "prompts": "\n".join([PROMPT, "A sailboat glides across a calm lake at sunset, gentle ripples on the water.",
                              "A busy city street at night with neon signs reflected in puddles, people walking."]),
        "expert": "low", "rank": 128, "alpha": 64.0, "steps": 3000, "learning_rate": 1e-5, "width": 256,
        "height": 256, "frames": 81, "backprop_steps": 1, "gpus": "auto", "deepspeed": "zero3_offload",
        "output_name": "my_reward_lora_low", "resume": True, "boundary": 0.9, "recipe": "recommended",
        "memory": "auto", "batch_size": 1, "gradient_accumulation": 0}, size=[440, 1100],
        models=["inp_high", "inp_low", "vae", "hps"])
    g.link(clip, 0, train, "clip")
    g.link(options, 0, train, "options")
    g.column()
    curve = g.node("PreviewImage", title="Reward curve")
    g.link(train, "reward_curve", curve, "images")
    scores = g.node("PreviewAny", title="Final scores")
    g.link(train, "scores", scores, "source")
    g.stage("Step 4 - Load the trained LoRA")
    uh, ul = experts(g, "inp_high", "inp_low")
    loader = g.node("WanRewardDualLoraLoader", {"lora_high": "None", "strength_high": 0.0, "strength_low": 0.7},
                    title="Load the trained LoRA (low-noise expert)")
    g.link(uh, 0, loader, "model_high")
    g.link(ul, 0, loader, "model_low")
    g.link(train, "lora_name", loader, "lora_low")
    report = g.node("PreviewAny", title="Load report")
    g.link(loader, "report", report, "source")
    g.stage("Step 5 - Preview: sample, decode and save", color="#b06634")
    start = g.node("LoadImage", {"image": "example.png", "upload": "image"}, title="Start image")
    inp = g.node("WanFunInpaintToVideo", {"width": 480, "height": 480, "length": 33, "batch_size": 1})
    g.link(pos, 0, inp, "positive")
    g.link(neg, 0, inp, "negative")
    g.link(vae, 0, inp, "vae")
    g.link(start, 0, inp, "start_image")
    g.column()
    sh, sl = shifts(g, (loader, 0), (loader, 1), 8.0)
    g.column()
    out = two_samplers(g, sh, sl, (inp, 0), (inp, 1), (inp, 2), steps=20, cfg=3.5, split=10, seed=42)
    g.column()
    decode_and_save(g, out, vae, "video/my_reward_lora_preview")
    return g.to_json()


def best_of_n(info: dict) -> dict:
    """Sample many cheap candidates (4-step lightx2v, a batch of 4), pick the best by reward, refine only it."""
    g = Graph(info, "Best-of-N: cheap candidates, pick the best by reward, refine it")
    g.stage("Step 1 - Load models")
    g.note(model_note(
        "Best-of-N by reward", "Samples a batch of 4 cheap candidate videos (lightx2v 4 steps with the HPS2.1 reward "
        "LoRAs), scores every one with HPS v2.1, keeps the best (Pick Best Video by Reward: frames_per_video counted "
        "from the latent batch) and refines only its latent: the last 8 of 20 low-noise steps at full quality. The "
        "pick (indices and scores) is in report_json and in the metadata of the saved first frames.",
        ["umt5", "vae", "t2v_high", "t2v_low", "lightx2v_high", "lightx2v_low", "hps_high", "hps_low", "hps"],
        ["Load models, the distill and reward LoRAs, and HPS v2.1.", "Prompt and a batch of 4 candidate latents.",
         "Sample the 4 candidates cheaply (4 steps, cfg 1).", "Decode them, score each, pick the best.",
         "Refine the best latent with more low-noise steps.", "Decode and save the refined video."]))
    g.column()
    clip = text_encoder(g)
    vae = vae_loader(g)
    uh, ul = experts(g, "t2v_high", "t2v_low")
    hps = g.node("WanRewardLoadRewardModel", {"model_name": MODELS["hps"][0]}, models=["hps"], title="HPS v2.1")
    g.column()
    lh, ll = lightx2v_loras(g, uh, ul)
    fast = reward_loras(g, (lh, 0), (ll, 0), 0.5, 0.5, title="Reward LoRAs on the 4-step experts")
    full = reward_loras(g, (uh, 0), (ul, 0), 0.5, 0.5, title="Reward LoRAs for refining")
    g.stage("Step 2 - Prompt and candidates")
    pos, neg = prompts(g, clip)
    latent = g.node("EmptyHunyuanLatentVideo", {"width": 480, "height": 480, "length": 33, "batch_size": 4},
                    title="4 candidate latents")
    g.stage("Step 3 - Sample the candidates cheaply", color="#b06634")
    sh, sl = shifts(g, (fast, 0), (fast, 1), 5.0)
    g.column()
    candidates = two_samplers(g, sh, sl, (pos, 0), (neg, 0), (latent, 0), steps=4, cfg=1.0, split=2,
                              control="randomize")
    g.stage("Step 4 - Decode, score and pick the best", color="#a1309b")
    dec = g.node("VAEDecode", title="Decode the candidates")
    g.link(candidates, 0, dec, "samples")
    g.link(vae, 0, dec, "vae")
    pick = g.node("WanRewardPickBest", {"prompt": PROMPT, "frames": "evenly_spaced", "n": 4, "top_k": 1,
                                        "frames_per_video": 0}, title="Pick the best candidate (HPS v2.1)")
    g.link(hps, 0, pick, "reward_model")
    g.link(dec, 0, pick, "candidate_1")
    g.link(candidates, 0, pick, "latent")
    g.column()
    report = g.node("PreviewAny", title="Pick report (indices and scores)")
    g.link(pick, "report_json", report, "source")
    first = g.node("ImageFromBatch", {"batch_index": 0, "length": 1}, title="First frame of the best")
    g.link(pick, "top_k", first, "image")
    saved = g.node("SaveImage", {"filename_prefix": "best_of_n/candidate"}, title="Save (the pick in its metadata)")
    g.link(first, 0, saved, "images")
    g.stage("Step 5 - Refine the best", color="#b06634")
    refine_shift = g.node("ModelSamplingSD3", {"shift": 8.0}, title="Shift (low, refine)")
    g.link(full, 1, refine_shift, "model")
    refine = g.node("KSamplerAdvanced", {
        "add_noise": "enable", "noise_seed": 7, "noise_seed.control": "fixed", "steps": 20, "cfg": 3.5,
        "sampler_name": "euler", "scheduler": "simple", "start_at_step": 12, "end_at_step": 10000,
        "return_with_leftover_noise": "disable"}, title="Refine: low noise, steps 12-20")
    g.link(refine_shift, 0, refine, "model")
    g.link(pos, 0, refine, "positive")
    g.link(neg, 0, refine, "negative")
    g.link(pick, "latent", refine, "latent_image")
    g.stage("Step 6 - Decode and save the refined video", color="#3f8f5f")
    decode_and_save(g, refine, vae, "video/best_of_n_refined")
    return g.to_json()


WORKFLOWS = {
    **{name: functools.partial(reward_lora_video, spec=spec) for name, spec in VIDEO_WORKFLOWS.items()},
    "reward_lora_score_and_compare.json": score_and_compare,
    "reward_lora_train_and_preview.json": train_then_preview,
    "reward_lora_best_of_n.json": best_of_n,
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--object-info", help="a saved /object_info JSON")
    source.add_argument("--url", help="a running ComfyUI with this pack, e.g. http://127.0.0.1:8188")
    parser.add_argument("--out", default=str(WORKFLOW_DIR))
    args = parser.parse_args(argv)
    if args.url:
        import requests

        info = requests.get(args.url.rstrip("/") + "/object_info", timeout=60).json()
    else:
        info = json.loads(Path(args.object_info).read_text(encoding="utf-8"))
    for name, build in WORKFLOWS.items():
        path = Path(args.out) / name
        path.write_text(json.dumps(build(info), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
