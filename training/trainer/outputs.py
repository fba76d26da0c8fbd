"""What a run writes besides its checkpoints: sample PNGs, the exact checkpoint average, and the
memory and DeepSpeed figures the progress events report."""

from __future__ import annotations

from pathlib import Path

import torch

from ..safe_io import atomic_write


def peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def current_memory_mb(device) -> float:
    """Memory held now (GPU allocated, or this process's resident set on CPU)."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2 ** 20
    import psutil

    return psutil.Process().memory_info().rss / 2 ** 20


def save_pngs(frames: torch.Tensor, folder: Path, step: int) -> list[str]:
    """Decoded frames as PNG files, each written atomically."""
    from PIL import Image

    paths = []
    for b in range(frames.shape[0]):
        for f in range(frames.shape[1]):
            array = (frames[b, f].permute(1, 2, 0).clamp(0, 1) * 255).round().byte().cpu().numpy()
            path = folder / f"sample-{step:06d}-{b}-{f}.png"
            image = Image.fromarray(array)
            atomic_write(path, lambda tmp, image=image: image.save(tmp, format="PNG"))
            paths.append(str(path))
    return paths


def average_loras(paths: list[Path]) -> dict[str, tuple]:
    """The average of k checkpoint LoRAs, exactly, as one LoRA of rank sum(r_i).

    mean_i(s_i B_i A_i) = U D with U = [s_1 B_1 ... s_k B_k] / k and D = [A_1; ...; A_k]
    (s_i = alpha_i / r_i, or 1 without alpha); alpha is set to the new rank so that the
    loader's scale alpha / rank is 1. Averaging up and down separately would be wrong:
    mean(B) mean(A) != mean(B A).
    """
    from ..lora_format import read_lora

    ups: dict[str, list] = {}
    downs: dict[str, list] = {}
    for path in paths:
        lora = read_lora(path)
        for native, parts in lora.modules.items():
            up, down = lora.tensors[parts["lora_up.weight"]].float(), lora.tensors[parts["lora_down.weight"]].float()
            scale = float(lora.tensors[parts["alpha"]]) / down.shape[0] if "alpha" in parts else 1.0
            ups.setdefault(native, []).append(up * scale / len(paths))
            downs.setdefault(native, []).append(down)
    out = {}
    for native in ups:
        if len(ups[native]) != len(paths):
            raise ValueError(f"module {native} is missing from some of the averaged LoRAs")
        up, down = torch.cat(ups[native], dim=1), torch.cat(downs[native], dim=0)
        out[native] = (up, down, float(down.shape[0]))
    return out


def deepspeed_layout(model, params) -> dict:
    """ZeRO stage, offload devices and whether the LoRA parameters really are partitioned."""
    def device(offload) -> str:
        value = getattr(offload, "device", None) if offload is not None else None
        return str(getattr(value, "value", value or "none"))

    return {"zero_stage": int(model.zero_optimization_stage()),
            "offload_param_device": device(model.zero_offload_param()),
            "offload_optimizer_device": device(model.zero_offload_optimizer()),
            "lora_params_partitioned": bool(params) and all(hasattr(p, "ds_id") for p in params)}
