"""Write the example workflows (ComfyUI UI format 0.4) from compact descriptions.

    python workflows/build_workflows.py --object-info object_info.json   # or --url http://127.0.0.1:8188

Widget orders come from a live ``/object_info`` (the pack must be loaded), so widgets_values
follow each node's real input order, with the extra control_after_generate value after seeds.
The JSON files are committed; tests/test_workflows.py checks them against /object_info.
"""

from __future__ import annotations

import argparse
import functools
import json
import uuid
from pathlib import Path
from typing import NamedTuple

HERE = Path(__file__).resolve().parent
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


class Graph:
    def __init__(self, object_info: dict, title: str):
        self.info = object_info
        self.title = title
        self.nodes: list[dict] = []
        self.links: list[list] = []
        self.groups: list[dict] = []

    def node(self, type_: str, pos, widgets: dict | None = None, title: str | None = None,
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
        node_id = len(self.nodes) + 1
        inputs = [{"name": name, "type": kind, "link": None}
                  for name, kind, _, is_widget in input_specs(info) if not is_widget]
        outputs = [{"name": info["output_name"][i], "type": t if isinstance(t, str) else "COMBO", "links": [],
                    "slot_index": i} for i, t in enumerate(info["output"])]
        properties = {"Node name for S&R": type_,
                      "cnr_id": PACK if info.get("python_module", "").startswith("custom_nodes") else "comfy-core",
                      "ver": PACK_VERSION if info.get("python_module", "").startswith("custom_nodes") else "0.3.64"}
        if models:
            properties["models"] = [{"name": MODELS[m][0], "url": MODELS[m][1], "directory": MODELS[m][2]}
                                    for m in models]
        n_widgets = len(values)
        node = {"id": node_id, "type": type_, "pos": list(pos),
                "size": list(size or [320, 46 + 24 * (len(inputs) + max(len(outputs), 0)) // 2 + 26 * n_widgets]),
                "flags": {}, "order": node_id - 1, "mode": mode, "inputs": inputs, "outputs": outputs,
                "properties": properties, "widgets_values": values}
        if title:
            node["title"] = title
        self.nodes.append(node)
        return node

    def link(self, src: dict, output: int | str, dst: dict, input_name: str) -> None:
        info = self.info[src["type"]]
        slot = output if isinstance(output, int) else info["output_name"].index(output)
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

    def group(self, title: str, nodes: list[dict], color: str = "#3f789e") -> None:
        xs = [n["pos"][0] for n in nodes] + [n["pos"][0] + n["size"][0] for n in nodes]
        ys = [n["pos"][1] for n in nodes] + [n["pos"][1] + n["size"][1] for n in nodes]
        self.groups.append({"id": len(self.groups) + 1, "title": title, "color": color, "font_size": 24,
                            "bounding": [min(xs) - 10, min(ys) - 40, max(xs) - min(xs) + 20, max(ys) - min(ys) + 50],
                            "flags": {}})

    def to_json(self) -> dict:
        return {"id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"{PACK}/{self.title}")), "revision": 0,
                "last_node_id": len(self.nodes), "last_link_id": len(self.links), "nodes": self.nodes,
                "links": self.links, "groups": self.groups, "config": {},
                "extra": {"ds": {"scale": 0.6, "offset": [0, 0]}, "frontendVersion": "1.27.10",
                          "info": {"title": self.title}},
                "version": 0.4}


# ---- shared pieces --------------------------------------------------------------------------

def text_and_vae(g: Graph, x: int, y: int, prompt: str = PROMPT):
    clip = g.node("CLIPLoader", (x, y), {"clip_name": MODELS["umt5"][0], "type": "wan", "device": "default"},
                  models=["umt5"])
    pos = g.node("CLIPTextEncode", (x + 360, y), {"text": prompt}, title="Positive prompt", size=[400, 160])
    neg = g.node("CLIPTextEncode", (x + 360, y + 200), {"text": NEGATIVE}, title="Negative prompt", size=[400, 160])
    vae = g.node("VAELoader", (x, y + 160), {"vae_name": MODELS["vae"][0]}, models=["vae"])
    g.link(clip, 0, pos, "clip")
    g.link(clip, 0, neg, "clip")
    return clip, pos, neg, vae


def experts(g: Graph, x: int, y: int, high: str, low: str):
    uh = g.node("UNETLoader", (x, y), {"unet_name": MODELS[high][0], "weight_dtype": "default"},
                title="High-noise expert", models=[high])
    ul = g.node("UNETLoader", (x, y + 130), {"unet_name": MODELS[low][0], "weight_dtype": "default"},
                title="Low-noise expert", models=[low])
    return uh, ul


def reward_loras(g: Graph, x: int, y: int, model_high, model_low, strength_high=0.5, strength_low=0.5,
                 title="Reward LoRAs (HPS2.1, both experts)"):
    loader = g.node("WanRewardDualLoraLoader", (x, y), {
        "lora_high": MODELS["hps_high"][0], "strength_high": strength_high,
        "lora_low": MODELS["hps_low"][0], "strength_low": strength_low}, title=title,
        models=["hps_high", "hps_low"], size=[360, 200])
    g.link(model_high[0], model_high[1], loader, "model_high")
    g.link(model_low[0], model_low[1], loader, "model_low")
    return loader


def two_samplers(g: Graph, x: int, y: int, model_high, model_low, pos, neg, latent, shift: float, steps: int,
                 cfg: float, split: int, seed: int = 42, control: str = "fixed"):
    """ModelSamplingSD3 on both experts and two KSamplerAdvanced split at ``split`` (as ComfyUI's templates)."""
    sh = g.node("ModelSamplingSD3", (x, y), {"shift": shift})
    sl = g.node("ModelSamplingSD3", (x, y + 90), {"shift": shift})
    g.link(model_high[0], model_high[1], sh, "model")
    g.link(model_low[0], model_low[1], sl, "model")
    k1 = g.node("KSamplerAdvanced", (x + 300, y), {
        "add_noise": "enable", "noise_seed": seed, "noise_seed.control": control, "steps": steps, "cfg": cfg,
        "sampler_name": "euler", "scheduler": "simple", "start_at_step": 0, "end_at_step": split,
        "return_with_leftover_noise": "enable"}, title="KSampler (high noise)", size=[300, 330])
    k2 = g.node("KSamplerAdvanced", (x + 620, y), {
        "add_noise": "disable", "noise_seed": 0, "noise_seed.control": "fixed", "steps": steps, "cfg": cfg,
        "sampler_name": "euler", "scheduler": "simple", "start_at_step": split, "end_at_step": 10000,
        "return_with_leftover_noise": "disable"}, title="KSampler (low noise)", size=[300, 330])
    g.link(sh, 0, k1, "model")
    g.link(sl, 0, k2, "model")
    for k in (k1, k2):
        g.link(pos[0], pos[1], k, "positive")
        g.link(neg[0], neg[1], k, "negative")
    g.link(latent[0], latent[1], k1, "latent_image")
    g.link(k1, 0, k2, "latent_image")
    return k2


def decode_and_save(g: Graph, x: int, y: int, samples, vae, prefix: str):
    dec = g.node("VAEDecode", (x, y))
    g.link(samples, 0, dec, "samples")
    g.link(vae, 0, dec, "vae")
    video = g.node("CreateVideo", (x, y + 80), {"fps": 16})
    g.link(dec, 0, video, "images")
    save = g.node("SaveVideo", (x + 360, y), {"filename_prefix": prefix, "format": "auto", "codec": "auto"},
                  size=[400, 400])
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
    image_to_video: bool = False
    lightx2v: bool = False
    shift: float = 8.0
    steps: int = 20
    cfg: float = 3.5
    split: int = 10


def reward_lora_video(info: dict, spec: VideoWorkflow) -> dict:
    g = Graph(info, spec.title)
    clip, pos, neg, vae = text_and_vae(g, 0, 0)
    uh, ul = experts(g, 0, 420, spec.high, spec.low)
    if spec.lightx2v:  # reward LoRAs stacked on the lightx2v 4-step distill LoRAs
        lh = g.node("LoraLoaderModelOnly", (360, 420), {"lora_name": MODELS["lightx2v_high"][0],
                    "strength_model": 1.0}, title="lightx2v 4-step (high)", models=["lightx2v_high"])
        ll = g.node("LoraLoaderModelOnly", (360, 560), {"lora_name": MODELS["lightx2v_low"][0],
                    "strength_model": 1.0}, title="lightx2v 4-step (low)", models=["lightx2v_low"])
        g.link(uh, 0, lh, "model")
        g.link(ul, 0, ll, "model")
        loras = reward_loras(g, 360, 720, (lh, 0), (ll, 0), 0.5, 0.5, title="Reward LoRAs on top (HPS2.1)")
    else:
        loras = reward_loras(g, 360, 420, (uh, 0), (ul, 0))
    if spec.image_to_video:
        start = g.node("LoadImage", (0, 700), {"image": "example.png", "upload": "image"}, title="Start image")
        inp = g.node("WanFunInpaintToVideo", (800, 0), {"width": 640, "height": 640, "length": 81, "batch_size": 1})
        g.link(pos, 0, inp, "positive")
        g.link(neg, 0, inp, "negative")
        g.link(vae, 0, inp, "vae")
        g.link(start, 0, inp, "start_image")
        positive, negative, latent = (inp, 0), (inp, 1), (inp, 2)
    else:
        empty = g.node("EmptyHunyuanLatentVideo", (800, 0), {"width": 640, "height": 640, "length": 81,
                                                               "batch_size": 1})
        positive, negative, latent = (pos, 0), (neg, 0), (empty, 0)
    out = two_samplers(g, 800, 420, (loras, 0), (loras, 1), positive, negative, latent, shift=spec.shift,
                       steps=spec.steps, cfg=spec.cfg, split=spec.split, control="randomize")
    decode_and_save(g, 1760, 420, out, vae, spec.prefix)
    return g.to_json()


VIDEO_WORKFLOWS = {
    "wan22_fun_inp_reward_lora.json": VideoWorkflow(
        "Wan2.2-Fun-A14B-InP + HPS2.1 reward LoRAs", "inp_high", "inp_low", "video/wan22_fun_inp_reward_lora",
        image_to_video=True),
    "wan22_t2v_reward_lora.json": VideoWorkflow(
        "Wan2.2 T2V A14B + HPS2.1 reward LoRAs", "t2v_high", "t2v_low", "video/wan22_t2v_reward_lora"),
    "wan22_t2v_lightx2v_reward_lora_stack.json": VideoWorkflow(
        "Wan2.2 T2V A14B: lightx2v 4-step + HPS2.1 reward LoRAs stacked", "t2v_high", "t2v_low",
        "video/wan22_t2v_lightx2v_reward_lora", lightx2v=True, shift=5.0, steps=4, cfg=1.0, split=2),
}


def _scores(g: Graph, x: int, y: int, frames, hps, mps, prompt: str, title: str):
    """HPS v2.1 and MPS scores (each node also reports motion) of one decoded video."""
    sh = g.node("WanRewardScoreFrames", (x, y), {"prompt": prompt, "frames": "evenly_spaced", "n": 8},
                title=f"HPS v2.1: {title}", size=[340, 300])
    sm = g.node("WanRewardScoreFrames", (x, y + 320), {"prompt": prompt, "frames": "evenly_spaced", "n": 8},
                title=f"MPS: {title}", size=[340, 300])
    for node, model in ((sh, hps), (sm, mps)):
        g.link(model, 0, node, "reward_model")
        g.link(frames, 0, node, "images")
    return sh, sm


def score_and_compare(info: dict) -> dict:
    """One seed with and without reward LoRAs side by side, scored; and a 3x3 strength grid."""
    g = Graph(info, "Score and compare: with/without reward LoRAs, strength grid")
    clip, pos, neg, vae = text_and_vae(g, 0, 0)
    uh, ul = experts(g, 0, 420, "t2v_high", "t2v_low")
    latent = g.node("EmptyHunyuanLatentVideo", (0, 700), {"width": 480, "height": 480, "length": 33, "batch_size": 1})
    hps = g.node("WanRewardLoadRewardModel", (0, 900), {"model_name": MODELS["hps"][0]}, models=["hps"],
                 title="HPS v2.1")
    mps = g.node("WanRewardLoadRewardModel", (0, 1060), {"model_name": MPS_FILE}, title="MPS (download it yourself)")
    sampling = dict(shift=8.0, steps=20, cfg=3.5, split=10, seed=42, control="fixed")
    # A/B: the same seed without and with the reward LoRAs
    base = two_samplers(g, 800, 0, (uh, 0), (ul, 0), (pos, 0), (neg, 0), (latent, 0), **sampling)
    loras = reward_loras(g, 360, 420, (uh, 0), (ul, 0), 1.0, 1.0)
    reward = two_samplers(g, 800, 420, (loras, 0), (loras, 1), (pos, 0), (neg, 0), (latent, 0), **sampling)
    decoded = []
    for i, (samples, name) in enumerate(((base, "without reward LoRAs"), (reward, "with reward LoRAs"))):
        dec = g.node("VAEDecode", (1760, 420 * i), title=f"Decode: {name}")
        g.link(samples, 0, dec, "samples")
        g.link(vae, 0, dec, "vae")
        _scores(g, 2000, 700 * i, dec, hps, mps, PROMPT, name)
        decoded.append(dec)
    side = g.node("ImageStitch", (2400, 0), {"direction": "right", "match_image_size": True, "spacing_width": 8,
                                             "spacing_color": "white"}, title="Side by side: without | with")
    g.link(decoded[0], 0, side, "image1")
    g.link(decoded[1], 0, side, "image2")
    video = g.node("CreateVideo", (2400, 260), {"fps": 16})
    g.link(side, 0, video, "images")
    save = g.node("SaveVideo", (2700, 0), {"filename_prefix": "video/reward_lora_ab"}, size=[480, 300])
    g.link(video, 0, save, "video")
    # Strength grid: high 0/0.5/1 (rows) x low 0/0.5/1 (columns), first frame of each into a contact sheet
    strengths = (0.0, 0.5, 1.0)
    x0, y0 = 3300, 0
    rows, report = [], None
    for r, sh in enumerate(strengths):
        row = None
        for c, sl in enumerate(strengths):
            x, y = x0 + c * 1400, y0 + r * 900
            cell = f"high {sh} / low {sl}"
            lo = reward_loras(g, x, y, (uh, 0), (ul, 0), sh, sl, title=f"Reward LoRAs {cell}")
            out = two_samplers(g, x + 380, y, (lo, 0), (lo, 1), (pos, 0), (neg, 0), (latent, 0), **sampling)
            dec = g.node("VAEDecode", (x + 380, y + 360), title=f"Decode {cell}")
            g.link(out, 0, dec, "samples")
            g.link(vae, 0, dec, "vae")
            s_h, s_m = _scores(g, x + 700, y + 360, dec, hps, mps, PROMPT, cell)
            for score, model in ((s_h, "hps"), (s_m, "mps")):
                # one JSON list of {"cell", "high", "low", "model", "scores"}: the labels ride in the delimiter
                label = f'{{"cell": "{cell}", "high": {sh}, "low": {sl}, "model": "{model}", "scores": '
                if report is None:
                    joined = g.node("StringConcatenate", (x + 1060, y + 360), {"string_a": "[" + label, "delimiter": ""},
                                    title="JSON: first cell")
                    g.link(score, 1, joined, "string_b")
                else:
                    joined = g.node("StringConcatenate", (x + 1060, y + 360 + (0 if model == "hps" else 200)),
                                    {"delimiter": "},\n" + label}, title=f"JSON + {cell} {model}")
                    g.link(report, 0, joined, "string_a")
                    g.link(score, 1, joined, "string_b")
                report = joined
            frame = g.node("ImageFromBatch", (x + 380, y + 460), {"batch_index": 0, "length": 1},
                           title=f"First frame {cell}")
            g.link(dec, 0, frame, "image")
            if row is None:
                row = frame
            else:
                stitched = g.node("ImageStitch", (x + 380, y + 600), {"direction": "right", "match_image_size": True,
                                                                      "spacing_width": 8, "spacing_color": "white"})
                g.link(row, 0, stitched, "image1")
                g.link(frame, 0, stitched, "image2")
                row = stitched
        rows.append(row)
    sheet = rows[0]
    for r, row in enumerate(rows[1:], 1):
        down = g.node("ImageStitch", (x0 + 4300, r * 300), {"direction": "down", "match_image_size": True,
                                                           "spacing_width": 8, "spacing_color": "white"},
                      title="Contact sheet rows: high 0 / 0.5 / 1 (top to bottom), low 0 / 0.5 / 1 (left to right)")
        g.link(sheet, 0, down, "image1")
        g.link(row, 0, down, "image2")
        sheet = down
    save_sheet = g.node("SaveImage", (x0 + 4700, 0), {"filename_prefix": "reward_lora_strength_grid"},
                        size=[600, 600])
    g.link(sheet, 0, save_sheet, "images")
    closed = g.node("StringConcatenate", (x0 + 4700, 650), {"string_b": "}]", "delimiter": ""}, title="JSON: close")
    g.link(report, 0, closed, "string_a")
    scores_json = g.node("PreviewAny", (x0 + 4700, 800), title="Scores JSON (every cell, HPS and MPS)",
                         size=[500, 400])
    g.link(closed, 0, scores_json, "source")
    return g.to_json()


def train_then_preview(info: dict) -> dict:
    """Train a reward LoRA for the low-noise expert, then load it and preview a short video."""
    g = Graph(info, "Train a reward LoRA, then load it and preview")
    clip, pos, neg, vae = text_and_vae(g, 0, 0)
    train = g.node("WanRewardLoraTrain", (800, 0), {
        "high_noise_model": MODELS["inp_high"][0], "low_noise_model": MODELS["inp_low"][0],
        "vae": MODELS["vae"][0], "reward_model": MODELS["hps"][0], "reward_weight": 1.0,
        "prompts": "\n".join([PROMPT, "A sailboat glides across a calm lake at sunset, gentle ripples on the water.",
                              "A busy city street at night with neon signs reflected in puddles, people walking."]),
        "expert": "low", "rank": 128, "alpha": 64.0, "steps": 2700, "learning_rate": 1e-5, "width": 256,
        "height": 256, "frames": 81, "backprop_steps": 1, "gpus": "auto", "deepspeed": "zero3_offload",
        "output_name": "my_reward_lora_low", "resume": True, "boundary": 0.9}, size=[420, 900],
        models=["inp_high", "inp_low", "vae", "hps"])
    g.link(clip, 0, train, "clip")
    g.group("1. Train (low-noise expert)", [train])
    uh, ul = experts(g, 1300, 0, "inp_high", "inp_low")
    loader = g.node("WanRewardDualLoraLoader", (1650, 0), {"lora_high": "None", "strength_high": 0.0,
                                                           "strength_low": 0.7},
                    title="Load the trained LoRA (low-noise expert)", size=[360, 200])
    g.link(uh, 0, loader, "model_high")
    g.link(ul, 0, loader, "model_low")
    g.link(train, "lora_name", loader, "lora_low")
    report = g.node("PreviewAny", (1650, 260), title="Load report", size=[360, 200])
    g.link(loader, "report", report, "source")
    curve = g.node("PreviewImage", (1300, 500), title="Reward curve", size=[420, 300])
    g.link(train, "reward_curve", curve, "images")
    scores = g.node("PreviewAny", (1300, 850), title="Final scores", size=[420, 250])
    g.link(train, "scores", scores, "source")
    start = g.node("LoadImage", (1650, 500), {"image": "example.png", "upload": "image"}, title="Start image")
    inp = g.node("WanFunInpaintToVideo", (2050, 500), {"width": 480, "height": 480, "length": 33, "batch_size": 1})
    g.link(pos, 0, inp, "positive")
    g.link(neg, 0, inp, "negative")
    g.link(vae, 0, inp, "vae")
    g.link(start, 0, inp, "start_image")
    out = two_samplers(g, 2050, 0, (loader, 0), (loader, 1), (inp, 0), (inp, 1), (inp, 2),
                       shift=8.0, steps=20, cfg=3.5, split=10, seed=42)
    decode_and_save(g, 3000, 0, out, vae, "video/my_reward_lora_preview")
    return g.to_json()


WORKFLOWS = {
    **{name: functools.partial(reward_lora_video, spec=spec) for name, spec in VIDEO_WORKFLOWS.items()},
    "reward_lora_score_and_compare.json": score_and_compare,
    "reward_lora_train_and_preview.json": train_then_preview,
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--object-info", help="a saved /object_info JSON")
    source.add_argument("--url", help="a running ComfyUI with this pack, e.g. http://127.0.0.1:8188")
    parser.add_argument("--out", default=str(HERE))
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
