"""Import the real ``hpsv2`` scorer offline (test helper; hpsv2 is a test-only reference).

hpsv2 1.2.0 lacks its BPE vocab (we copy open_clip's identical file in) and imports
``turtle`` (tkinter) for nothing (stubbed when tkinter is missing).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import types
from pathlib import Path

import pytest


def import_hpsv2(tmp_dir: Path):
    spec = importlib.util.find_spec("hpsv2")
    if spec is None:
        pytest.skip("hpsv2 not installed: python -m pip install --no-deps -r tests/requirements-reference.txt "
                    "&& python -m pip install -r tests/requirements-reference-deps.txt")
    package = Path(spec.origin).parent
    bpe = package / "src" / "open_clip" / "bpe_simple_vocab_16e6.txt.gz"
    if not bpe.exists():
        from open_clip.tokenizer import default_bpe

        shutil.copyfile(default_bpe(), bpe)
    try:
        import turtle  # noqa: F401
    except Exception:
        sys.modules["turtle"] = types.SimpleNamespace(forward=None)
    os.environ.setdefault("HPS_ROOT", str(tmp_dir / "hps_root"))
    import hpsv2.img_score as img_score
    from hpsv2.src.open_clip import add_model_config, create_model_and_transforms

    return img_score, add_model_config, create_model_and_transforms


def build_reference_model(tmp_dir: Path, name: str, config: dict):
    """The model and val transform exactly as ``hpsv2.img_score.initialize_model`` builds them,
    with ``config`` registered under ``name`` and no pretrained download."""
    img_score, add_model_config, create_model_and_transforms = import_hpsv2(tmp_dir)
    config_dir = tmp_dir / "open_clip_configs"
    config_dir.mkdir(exist_ok=True)
    (config_dir / f"{name}.json").write_text(json.dumps(config))
    add_model_config(config_dir)
    model, _, preprocess_val = create_model_and_transforms(
        name, None, precision="amp", device="cpu", jit=False, force_quick_gelu=False,
        force_custom_text=False, force_patch_dropout=False, force_image_size=None,
        pretrained_image=False, image_mean=None, image_std=None, light_augmentation=True,
        aug_cfg={}, output_dict=True, with_score_predictor=False, with_region_predictor=False)
    return img_score, model, preprocess_val


def reference_scores(img_score, model, preprocess_val, images, prompt: str, checkpoint: Path) -> list[float]:
    """``hpsv2.img_score.score(images, prompt, cp=checkpoint)`` on CPU in fp32."""
    img_score.device = "cpu"
    img_score.model_dict.clear()
    img_score.model_dict.update(model=model, preprocess_val=preprocess_val)
    return [float(s) for s in img_score.score(list(images), prompt, cp=str(checkpoint))]
