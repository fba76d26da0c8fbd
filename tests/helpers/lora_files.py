"""LoRA files in every key format the loader reads, written from (up, down, alpha) per module: shared
by the format tests and the ComfyUI loader tests."""

from __future__ import annotations

import torch

from training.wan_names import native_to_diffusers


def _updown(prefix, name, up, down, alpha, a_b=False, default=False):
    d = ".default" if default else ""
    keys = {f"{prefix}{name}.lora_B{d}.weight": up, f"{prefix}{name}.lora_A{d}.weight": down} if a_b else \
        {f"{prefix}{name}.lora_up.weight": up, f"{prefix}{name}.lora_down.weight": down}
    if alpha is not None:
        keys[f"{prefix}{name}.alpha"] = torch.tensor(alpha)
    return keys


def _lycoris_name(m):
    # ai-toolkit mixes native attention names with diffusers FFN / to_out names
    return (m.replace("ffn.0", "ffn.net.0.proj").replace("ffn.2", "ffn.net.2")
            .replace("self_attn.o", "self_attn.to_out.0").replace(".", "_"))


# format -> (file keys for one module, uses alpha)
FORMATS = {
    "videox_fun": lambda m, u, d, a: _updown("lora_unet__", m.replace(".", "_"), u, d, a),
    "kohya_musubi": lambda m, u, d, a: _updown("lora_unet_", m.replace(".", "_"), u, d, a),
    "comfy_format": lambda m, u, d, a: _updown("diffusion_model.", m, u, d, a),
    "comfy_lora_A_B": lambda m, u, d, a: _updown("diffusion_model.", m, u, d, a, a_b=True),
    "peft_diffusers": lambda m, u, d, a: _updown("transformer.", native_to_diffusers(m), u, d, None, a_b=True),
    "peft_diffusers_default": lambda m, u, d, a: _updown("transformer.", native_to_diffusers(m), u, d, None,
                                                         a_b=True, default=True),
    "peft_base_model": lambda m, u, d, a: _updown("base_model.model.", m, u, d, None, a_b=True),
    "bare_native": lambda m, u, d, a: _updown("", m, u, d, a),
    "bare_diffusers": lambda m, u, d, a: _updown("", native_to_diffusers(m), u, d, None, a_b=True),
    "lycoris_ai_toolkit": lambda m, u, d, a: _updown("lycoris_", _lycoris_name(m), u, d, a),
    "diffsynth_pipe_dit": lambda m, u, d, a: _updown("pipe.dit.", m, u, d, None, a_b=True, default=True),
    "diffsynth_no_prefix_default": lambda m, u, d, a: _updown("", m, u, d, None, a_b=True, default=True),
    "finetrainers": lambda m, u, d, a: _updown("diffusion_model.", native_to_diffusers(m), u, d, None, a_b=True),
}
WITH_ALPHA = {"videox_fun", "kohya_musubi", "comfy_format", "comfy_lora_A_B", "bare_native", "lycoris_ai_toolkit"}
FORMAT_NAME = {
    "videox_fun": "VideoX-Fun", "kohya_musubi": "kohya/musubi-tuner", "comfy_format": "ComfyUI",
    "peft_diffusers": "diffusers/PEFT (diffusers names)", "peft_base_model": "PEFT",
    "lycoris_ai_toolkit": "ai-toolkit/LyCORIS", "diffsynth_pipe_dit": "DiffSynth-Studio",
    "diffsynth_no_prefix_default": "DiffSynth-Studio/PEFT (no prefix, .default.)",
    "finetrainers": "finetrainers", "bare_native": "bare native names", "bare_diffusers": "bare diffusers names",
}
