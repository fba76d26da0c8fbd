"""Test-only ComfyUI pack (never shipped): saves a model's weights as ComfyUI applies them.

``ProbeSaveModelWeights`` loads the MODEL the way a sampler does (``load_models_gpu``,
which applies LoRA patches) and writes its state dict to the output folder, so tests
can compare the patched weights with their own computation.
"""

import os

import comfy.model_management
import folder_paths
from safetensors.torch import save_file


class ProbeSaveModelWeights:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "filename": ("STRING", {"default": "probe"})}}

    RETURN_TYPES = ()
    FUNCTION = "save"
    OUTPUT_NODE = True
    CATEGORY = "testing"

    def save(self, model, filename):
        comfy.model_management.load_models_gpu([model], force_full_load=True)
        state = {k: v.detach().float().cpu().contiguous() for k, v in model.model.state_dict().items()}
        path = os.path.join(folder_paths.get_output_directory(), os.path.basename(filename) + ".safetensors")
        save_file(state, path, metadata={"model_class": type(model.model).__name__,
                                         "dtype": str(model.model.get_dtype())})
        return {"ui": {"text": [path]}}


class ProbeRandomConditioning:
    """Stands in for CLIPTextEncode with tiny models (ComfyUI's umt5 loader has a fixed xxl size):
    a seeded random [1, L, 4096] conditioning, distinct per text."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"text": ("STRING", {"multiline": True, "default": ""}),
                             "length": ("INT", {"default": 8, "min": 1, "max": 512})}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"
    CATEGORY = "testing"

    def encode(self, text, length):
        import hashlib

        import torch

        seed = int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)
        cond = torch.randn(1, length, 4096, generator=torch.Generator().manual_seed(seed)) * 0.1
        return ([[cond, {}]],)


NODE_CLASS_MAPPINGS = {"ProbeSaveModelWeights": ProbeSaveModelWeights,
                       "ProbeRandomConditioning": ProbeRandomConditioning}
