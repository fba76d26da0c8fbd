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


class ProbeTinyUMT5Clip:
    """A CLIP with ComfyUI's real Wan umT5 classes (tokenizer, padding, masking) at a tiny size:
    config overrides through model_options, a small SentencePiece model with umT5's special ids
    (pad 0, eos 1), seeded random weights. CLIPLoader cannot load such a file (its config is xxl)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2 ** 31 - 1})}}

    RETURN_TYPES = ("CLIP",)
    FUNCTION = "build"
    CATEGORY = "testing"

    def build(self, seed):
        import io

        import comfy.sd
        import comfy.supported_models_base
        import comfy.text_encoders.wan
        import sentencepiece
        import torch

        corpus = ["a red fox running through snow", "a sailboat on a calm lake at sunset",
                  "a city street at night with neon signs", "a cat sleeping on a windowsill"] * 20
        model = io.BytesIO()
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(corpus), model_writer=model, vocab_size=60, pad_id=0, eos_id=1, unk_id=2,
            bos_id=-1, model_type="unigram", hard_vocab_limit=False)
        target = comfy.supported_models_base.ClipTarget(comfy.text_encoders.wan.WanT5Tokenizer,
                                                        comfy.text_encoders.wan.te())
        config = {"num_layers": 1, "d_ff": 64, "num_heads": 2, "d_kv": 16, "vocab_size": 64}
        clip = comfy.sd.CLIP(target=target, tokenizer_data={"spiece_model": model.getvalue()},
                             model_options={"umt5xxl_model_config": config, "dtype": torch.float32})
        gen = torch.Generator().manual_seed(seed)
        state = {k: torch.randn(v.shape, generator=gen) * 0.05 + (1.0 if "layer_norm" in k else 0.0)
                 for k, v in clip.cond_stage_model.state_dict().items()}
        clip.cond_stage_model.load_state_dict(state)
        return (clip,)


class ProbeSaveConditioning:
    """Writes a CONDITIONING's tensor to the output folder (what CLIPTextEncode produced)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"conditioning": ("CONDITIONING",), "filename": ("STRING", {"default": "cond"})}}

    RETURN_TYPES = ()
    FUNCTION = "save"
    OUTPUT_NODE = True
    CATEGORY = "testing"

    def save(self, conditioning, filename):
        path = os.path.join(folder_paths.get_output_directory(), os.path.basename(filename) + ".safetensors")
        save_file({"cond": conditioning[0][0].float().contiguous()}, path)
        return {"ui": {"text": [path]}}


class ProbeMakeImage:
    """An IMAGE batch no core node makes: ``channels`` channels, or a NaN in frame ``nan_frame`` (-1: none)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"frames": ("INT", {"default": 2, "min": 0}), "channels": ("INT", {"default": 3, "min": 1}),
                             "nan_frame": ("INT", {"default": -1, "min": -1})}}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "make"
    CATEGORY = "testing"

    def make(self, frames, channels, nan_frame):
        import torch

        images = torch.rand(frames, 32, 32, channels, generator=torch.Generator().manual_seed(0))
        if 0 <= nan_frame < frames:
            images[nan_frame, 0, 0, 0] = float("nan")
        return (images,)


class ProbeSaveLatent:
    """Writes a LATENT's samples (and its batch_index, in the metadata) to the output folder."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",), "filename": ("STRING", {"default": "latent"})}}

    RETURN_TYPES = ()
    FUNCTION = "save"
    OUTPUT_NODE = True
    CATEGORY = "testing"

    def save(self, samples, filename):
        import json

        path = os.path.join(folder_paths.get_output_directory(), os.path.basename(filename) + ".safetensors")
        save_file({"samples": samples["samples"].float().contiguous()}, path,
                  metadata={"batch_index": json.dumps(samples.get("batch_index"))})
        return {"ui": {"text": [path]}}


class ProbeRecordSamplingWeights:
    """A MODEL that records, at every model call of a sampler, the sigma and one weight as the model
    sees it then (hooks applied), with ComfyUI's percent -> sigma of the given ``percents``; written to
    ``<output>/<filename>.safetensors`` after each call."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "module": ("STRING", {"default": "blocks.0.self_attn.q"}),
                             "percents": ("STRING", {"default": ""}), "filename": ("STRING", {"default": "record"})}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "wrap"
    CATEGORY = "testing"

    def wrap(self, model, module, percents, filename):
        import json

        import comfy.patcher_extension
        import comfy.utils

        path = os.path.join(folder_paths.get_output_directory(), os.path.basename(filename) + ".safetensors")
        records = {"sigmas": [], "weights": []}

        def wrapper(executor, x, t, *args, **kwargs):
            base = executor.class_obj
            weight = comfy.utils.get_attr(base, f"diffusion_model.{module}.weight")
            records["sigmas"].append(float(t.flatten()[0]))
            records["weights"].append(weight.detach().float().cpu().clone())
            thresholds = {p: float(base.model_sampling.percent_to_sigma(float(p))) for p in percents.split(",") if p}
            save_file({f"weight_{i}": w for i, w in enumerate(records["weights"])}, path,
                      metadata={"sigmas": json.dumps(records["sigmas"]), "thresholds": json.dumps(thresholds)})
            return executor(x, t, *args, **kwargs)

        patched = model.clone()
        patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "probe_record", wrapper)
        return (patched,)


NODE_CLASS_MAPPINGS = {"ProbeSaveModelWeights": ProbeSaveModelWeights,
                       "ProbeTinyUMT5Clip": ProbeTinyUMT5Clip,
                       "ProbeSaveConditioning": ProbeSaveConditioning,
                       "ProbeMakeImage": ProbeMakeImage,
                       "ProbeSaveLatent": ProbeSaveLatent,
                       "ProbeRecordSamplingWeights": ProbeRecordSamplingWeights}
