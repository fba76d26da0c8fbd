"""ComfyUI tier: the trainer's LoRA, applied to ComfyUI's own WanModel at strength 1, changes
ComfyUI's output exactly as the adapters change the trainer's (diffusers) model."""

from __future__ import annotations

import subprocess
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import comfyui_path
from training.lora_format import save_canonical_lora
from training.safe_io import save_safetensors
from training.tiny_models import tiny_wan_state_dict
from training.trainer.lora import add_lora, lora_parameters, lora_state, native_modules
from training.trainer.models import load_wan_expert

# Runs in ComfyUI's Python: ComfyUI loads the expert and the LoRA its own way (as its
# UNETLoader / LoraLoaderModelOnly nodes do) and runs WanModel's forward on CPU.
COMFY_SIDE = textwrap.dedent("""
    import sys
    comfy_path, folder = sys.argv[1], sys.argv[2]
    sys.path.insert(0, comfy_path)
    sys.argv = [sys.argv[0], "--cpu"]
    import comfy.options
    comfy.options.enable_args_parsing()
    import torch
    import comfy.model_management, comfy.sd, comfy.utils
    from safetensors.torch import load_file, save_file
    inputs = load_file(folder + "/inputs.safetensors")
    patcher = comfy.sd.load_diffusion_model_state_dict(comfy.utils.load_torch_file(folder + "/expert.safetensors"),
                                                       model_options={"dtype": torch.float32})
    def run(p):
        comfy.model_management.load_models_gpu([p], force_full_load=True)
        with torch.no_grad():
            return p.model.diffusion_model(inputs["x"], inputs["t"], inputs["ctx"]).float().contiguous()
    base = run(patcher)
    patched, _ = comfy.sd.load_lora_for_models(patcher, None, comfy.utils.load_torch_file(folder + "/lora.safetensors"), 1.0, 0)
    save_file({"base": base, "lora": run(patched)}, folder + "/outputs.safetensors")
""")


@pytest.mark.comfyui
def test_lora_changes_comfyui_model_exactly_as_trainer_model(tmp_path):
    comfy = comfyui_path()
    python = comfy / ".venv" / "bin" / "python"
    if not python.exists():
        pytest.skip(f"no ComfyUI venv at {python}")
    save_safetensors(tiny_wan_state_dict(seed=0), tmp_path / "expert.safetensors")
    trainer_model = load_wan_expert(tmp_path / "expert.safetensors", torch.float32)
    base_model = load_wan_expert(tmp_path / "expert.safetensors", torch.float32)
    add_lora(trainer_model, rank=4, alpha=2.0, targets="all_linear", exclude=["ffn"])
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in lora_parameters(trainer_model).values():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
    save_canonical_lora(tmp_path / "lora.safetensors", native_modules(lora_state(trainer_model), 2.0), {})
    x = torch.randn(1, 36, 2, 4, 4, generator=gen)
    t = torch.tensor([700.0])
    ctx = torch.randn(1, 16, 4096, generator=gen)
    save_file({"x": x, "t": t, "ctx": ctx}, tmp_path / "inputs.safetensors")
    with torch.no_grad():
        ours = trainer_model(x, t, ctx, return_dict=False)[0] - base_model(x, t, ctx, return_dict=False)[0]
    (tmp_path / "comfy_side.py").write_text(COMFY_SIDE)
    proc = subprocess.run([str(python), str(tmp_path / "comfy_side.py"), str(comfy), str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = load_file(tmp_path / "outputs.safetensors")
    theirs = out["lora"] - out["base"]
    assert ours.abs().max() > 0.05  # the LoRA changes the output noticeably
    assert torch.allclose(theirs, ours, atol=1e-4), float((theirs - ours).abs().max())
