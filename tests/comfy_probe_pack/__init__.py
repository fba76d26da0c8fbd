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


NODE_CLASS_MAPPINGS = {"ProbeSaveModelWeights": ProbeSaveModelWeights}
