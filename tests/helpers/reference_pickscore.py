"""PickScore's reference scoring, re-implemented for the equality test (PickScore is no PyPI package).

Follows the "Inference with PickScore" code of the PickScore repository's README
(github.com/yuvalkirstain/PickScore, MIT): laion's CLIPProcessor on PIL images and on the
prompt (``padding=True, truncation=True, max_length=77``), ``get_image_features`` /
``get_text_features`` of a transformers CLIPModel, each divided by its norm, and
``logit_scale.exp() * text @ image.T``. The processor is the PIL one transformers 4.x used
(``CLIPImageProcessorPil`` in 5.x), with the values of laion/CLIP-ViT-H-14-laion2B-s32B-b79K's
preprocessor_config.json; the tokenizer is that model's (built offline by the pack; its ids are
checked against open_clip's elsewhere).
"""

from __future__ import annotations

import torch

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def laion_image_processor():
    try:
        from transformers import (
            CLIPImageProcessorPil as Processor,  # transformers 5: the PIL backend
        )
    except ImportError:
        from transformers import (
            CLIPImageProcessor as Processor,  # transformers 4: PIL already
        )
    return Processor(do_resize=True, size={"shortest_edge": 224}, resample=3, do_center_crop=True,
                     crop_size={"height": 224, "width": 224}, do_rescale=True, rescale_factor=1 / 255,
                     do_normalize=True, image_mean=CLIP_MEAN, image_std=CLIP_STD, do_convert_rgb=True)


def _features(output) -> torch.Tensor:
    """``get_*_features`` returns the tensor in transformers 4.x, an output with it as pooler_output in 5.x."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def reference_pixels(images) -> torch.Tensor:
    return laion_image_processor()(images=list(images), return_tensors="pt")["pixel_values"]


def reference_scores(model, prompt: str, images=None, pixels=None) -> torch.Tensor:
    """The README's ``calc_probs`` up to the scores (before the softmax), from PIL ``images`` or from
    already preprocessed ``pixels``."""
    from training.rewards.tokenizers import mps_tokenizer

    if pixels is None:
        pixels = reference_pixels(images)
    text = mps_tokenizer()(prompt, padding=True, truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        image_embs = _features(model.get_image_features(pixel_values=pixels))
        image_embs = image_embs / torch.norm(image_embs, dim=-1, keepdim=True)
        text_embs = _features(model.get_text_features(input_ids=text["input_ids"],
                                                      attention_mask=text["attention_mask"]))
        text_embs = text_embs / torch.norm(text_embs, dim=-1, keepdim=True)
        return model.logit_scale.exp() * (text_embs @ image_embs.T)[0]
