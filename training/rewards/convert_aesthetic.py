"""Join the LAION aesthetic predictor's MLP and its CLIP ViT-L/14 image encoder into one file.

The released predictor (``sac+logos+ava1-l14-linearMSE.pth``, a plain state dict read with
``weights_only=True``) holds only the MLP; it scores OpenAI CLIP ViT-L/14 image embeddings.
The encoder comes from a transformers CLIP file (``model.safetensors`` of
``openai/clip-vit-large-patch14``: a whole CLIPModel, or a CLIPVisionModelWithProjection); only
its vision tower and ``visual_projection`` are kept.

    python -m training.rewards.convert_aesthetic sac+logos+ava1-l14-linearMSE.pth \\
        clip-vit-large-patch14.safetensors laion_aesthetic_v2.safetensors
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from ..safe_io import UserFileError, save_safetensors
from .aesthetic import MLP_PREFIX, is_mlp_only, mlp_sizes


def join_aesthetic(mlp: dict[str, torch.Tensor], clip: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The joined state dict (``vision_model.*``, ``visual_projection.weight``, ``mlp.layers.*``);
    UserFileError naming what does not fit."""
    from .registry import _strip_prefixes, describe_keys

    mlp, clip = _strip_prefixes(mlp), _strip_prefixes(clip)
    if not is_mlp_only(mlp):
        raise UserFileError(f"the predictor file is not the aesthetic MLP (layers.N.weight/bias): found "
                            f"{describe_keys(mlp)}")
    vision = {k: v for k, v in clip.items() if k.startswith("vision_model.") or k == "visual_projection.weight"}
    if "visual_projection.weight" not in vision or "vision_model.embeddings.patch_embedding.weight" not in vision:
        raise UserFileError("the CLIP file has no transformers vision tower with its projection (vision_model.*, "
                            f"visual_projection.weight): found {describe_keys(clip)}")
    try:
        sizes = mlp_sizes(mlp)
    except ValueError as exc:
        raise UserFileError(f"the predictor's layers do not chain: {exc}") from None
    width, first = int(vision["visual_projection.weight"].shape[0]), sizes[min(sizes)][1]
    if width != first:
        raise UserFileError(f"the CLIP file gives {width}-d image embeddings but the MLP takes {first}: the "
                            "predictor v2 needs CLIP ViT-L/14 (768-d)")
    return {**{k: v for k, v in vision.items() if not k.endswith("position_ids")},
            **{MLP_PREFIX + k: v for k, v in mlp.items()}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mlp", help="sac+logos+ava1-l14-linearMSE.pth (the predictor's MLP)")
    parser.add_argument("clip", help="the CLIP ViT-L/14 file in the transformers layout (.safetensors or .bin)")
    parser.add_argument("target", help="output .safetensors")
    args = parser.parse_args(argv)
    if not args.target.endswith(".safetensors"):
        parser.error("target must end in .safetensors")
    from .registry import read_state_dict

    try:
        joined = join_aesthetic(read_state_dict(args.mlp), read_state_dict(args.clip))
    except UserFileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    save_safetensors(joined, args.target, metadata={"kind": "laion_aesthetic_v2", "mlp": Path(args.mlp).name,
                                                   "encoder": Path(args.clip).name})
    print(f"wrote {args.target}: {len(joined)} tensors (aesthetic predictor: CLIP vision tower + MLP)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
