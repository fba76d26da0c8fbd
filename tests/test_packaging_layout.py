"""The pack's shape: training/ imports without ComfyUI, names map both ways."""

import subprocess
import sys

import pytest
import torch

from tests.helpers.tiny_wan import tiny_config, tiny_wan_state_dict
from tests.helpers import PACK_ROOT
from training.wan_names import diffusers_to_native, native_to_diffusers



def test_training_never_imports_comfyui():
    code = (
        "import sys, pkgutil, importlib, training\n"
        "for m in pkgutil.walk_packages(training.__path__, 'training.'):\n"
        "    if m.name.endswith('__main__') or m.name == 'training.demo': continue\n"
        "    importlib.import_module(m.name)\n"
        "bad = [n for n in sys.modules if n.split('.')[0] in ('comfy', 'comfy_api', 'folder_paths', 'nodes', 'server')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=PACK_ROOT, check=True)


@pytest.mark.parametrize("native, diffusers", [
    ("blocks.0.self_attn.q", "blocks.0.attn1.to_q"),
    ("blocks.12.self_attn.o", "blocks.12.attn1.to_out.0"),
    ("blocks.3.cross_attn.v", "blocks.3.attn2.to_v"),
    ("blocks.3.cross_attn.k_img", "blocks.3.attn2.add_k_proj"),
    ("blocks.1.ffn.0", "blocks.1.ffn.net.0.proj"),
    ("blocks.1.norm3", "blocks.1.norm2"),
    ("blocks.1.modulation", "blocks.1.scale_shift_table"),
    ("text_embedding.2", "condition_embedder.text_embedder.linear_2"),
    ("time_projection.1", "condition_embedder.time_proj"),
    ("head.head", "proj_out"),
])
def test_name_table_round_trip(native, diffusers):
    assert native_to_diffusers(native) == diffusers
    assert diffusers_to_native(diffusers) == native


def test_unknown_names_are_none():
    assert native_to_diffusers("blocks.0.self_attn.qq") is None
    assert diffusers_to_native("down_blocks.0.attn") is None


@pytest.mark.parametrize("in_dim", [16, 36])
def test_tiny_expert_has_the_real_layout(in_dim):
    """diffusers' own converter maps our tiny native checkpoint with nothing left over."""
    from diffusers import WanTransformer3DModel
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    c = tiny_config(in_dim=in_dim)
    converted = convert_wan_transformer_to_diffusers(tiny_wan_state_dict(in_dim=in_dim))
    model = WanTransformer3DModel(
        patch_size=c["patch_size"], num_attention_heads=c["num_heads"], attention_head_dim=c["head_dim"],
        in_channels=in_dim, out_channels=c["out_dim"], text_dim=c["text_dim"], freq_dim=c["freq_dim"],
        ffn_dim=c["ffn_dim"], num_layers=c["num_layers"], cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6,
    )
    missing, unexpected = model.load_state_dict(converted, strict=False)
    assert missing == [] and unexpected == []
    assert torch.equal(model.blocks[1].attn1.to_q.weight, tiny_wan_state_dict(in_dim=in_dim)["blocks.1.self_attn.q.weight"])
