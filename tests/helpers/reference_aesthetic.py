"""The LAION aesthetic predictor's reference scoring, for the equality test.

Follows ``simple_inference.py`` of github.com/christophschuhmann/improved-aesthetic-predictor
(Apache-2.0; not a PyPI package, so its steps are re-implemented here): OpenAI's ``clip`` code
(PyPI ``openai-clip``, installed test-only with --no-deps) with its own ``preprocess``
(Resize 224 bicubic, CenterCrop 224, ToTensor, Normalize) and ``encode_image``; the embedding
L2-normalised in numpy (``normalized``, a zero norm left as 1); the MLP, an ``nn.Sequential`` of
Linear 768->1024, Dropout 0.2, Linear ->128, Dropout 0.2, Linear ->64, Dropout 0.1, Linear ->16,
Linear ->1, in eval mode.

The OpenAI layout of the weights is mapped to the transformers one here (the layout the pack
reads), following the key correspondence of transformers' convert_clip_original_pytorch_to_hf.
"""

from __future__ import annotations

import importlib.util
import sys
import types

import numpy as np
import pytest
import torch
from torch import nn


def import_clip():
    if importlib.util.find_spec("clip") is None:
        pytest.skip("openai-clip not installed: python -m pip install --no-deps -r tests/requirements-reference.txt")
    try:
        import pkg_resources  # noqa: F401 (whether it exists)
    except ImportError:  # setuptools >= 81 has no pkg_resources: give clip the one name it uses
        import packaging
        import packaging.version

        sys.modules["pkg_resources"] = types.SimpleNamespace(packaging=packaging)
    import clip

    return clip


class ReferenceMLP(nn.Module):
    """simple_inference.py's MLP (its pytorch_lightning base class dropped: only ``layers`` is used)."""

    def __init__(self, input_size: int, widths=(1024, 128, 64, 16)):
        super().__init__()
        a, b, c, d = widths
        self.layers = nn.Sequential(nn.Linear(input_size, a), nn.Dropout(0.2), nn.Linear(a, b), nn.Dropout(0.2),
                                    nn.Linear(b, c), nn.Dropout(0.1), nn.Linear(c, d), nn.Linear(d, 1))

    def forward(self, x):
        return self.layers(x)


def normalized(a, axis=-1, order=2):
    l2 = np.atleast_1d(np.linalg.norm(a, order, axis))
    l2[l2 == 0] = 1
    return a / np.expand_dims(l2, axis)


def reference_scores(clip_model, preprocess, mlp, images) -> list[float]:
    """One image at a time, as simple_inference.py (fp32 on CPU)."""
    scores = []
    for image in images:
        pixels = preprocess(image).unsqueeze(0)
        with torch.no_grad():
            features = clip_model.encode_image(pixels)
            embedding = normalized(features.cpu().detach().numpy())
            scores.append(float(mlp(torch.from_numpy(embedding).float())[0, 0]))
    return scores


def openai_vision_to_transformers(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenAI CLIP ``visual.*`` keys -> transformers ``vision_model.*`` and ``visual_projection.weight``."""
    out = {"vision_model.embeddings.class_embedding": state_dict["visual.class_embedding"],
           "vision_model.embeddings.position_embedding.weight": state_dict["visual.positional_embedding"],
           "vision_model.embeddings.patch_embedding.weight": state_dict["visual.conv1.weight"],
           "visual_projection.weight": state_dict["visual.proj"].T.contiguous()}
    for ours, theirs in (("pre_layrnorm", "ln_pre"), ("post_layernorm", "ln_post")):
        for part in ("weight", "bias"):
            out[f"vision_model.{ours}.{part}"] = state_dict[f"visual.{theirs}.{part}"]
    blocks = sorted({int(k.split(".")[3]) for k in state_dict if k.startswith("visual.transformer.resblocks.")})
    for i in blocks:
        src, dst = f"visual.transformer.resblocks.{i}.", f"vision_model.encoder.layers.{i}."
        for part in ("weight", "bias"):
            q, k, v = state_dict[src + f"attn.in_proj_{part}"].chunk(3)
            out |= {dst + f"self_attn.q_proj.{part}": q, dst + f"self_attn.k_proj.{part}": k,
                    dst + f"self_attn.v_proj.{part}": v,
                    dst + f"self_attn.out_proj.{part}": state_dict[src + f"attn.out_proj.{part}"],
                    dst + f"layer_norm1.{part}": state_dict[src + f"ln_1.{part}"],
                    dst + f"layer_norm2.{part}": state_dict[src + f"ln_2.{part}"],
                    dst + f"mlp.fc1.{part}": state_dict[src + f"mlp.c_fc.{part}"],
                    dst + f"mlp.fc2.{part}": state_dict[src + f"mlp.c_proj.{part}"]}
    return {k: v.contiguous() for k, v in out.items()}
