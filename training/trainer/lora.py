"""The trained LoRA: peft adapters on the chosen Linear layers, exported in native names."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping

import torch

from ..wan_names import diffusers_to_native


def select_targets(natives, targets, exclude: list[str]) -> list[str]:
    """The native module paths among ``natives`` (Linear layers) that a LoRA adapts.

    ``targets``: "all_linear" or native suffixes (``self_attn.q``, ``text_embedding.0``);
    ``exclude``: substrings of native paths to skip (the reference skips ``ffn``).
    """
    chosen = []
    for native in natives:
        if any(part in native for part in exclude):
            continue
        if targets != "all_linear" and not any(native == t or native.endswith("." + t) for t in targets):
            continue
        chosen.append(native)
    return chosen


def target_modules(model: torch.nn.Module, targets, exclude: list[str]) -> list[str]:
    """diffusers module paths of the Linear layers of ``model`` to adapt (see ``select_targets``)."""
    linears = {diffusers_to_native(name): name for name, module in model.named_modules()
               if isinstance(module, torch.nn.Linear) and diffusers_to_native(name) is not None}
    return [linears[native] for native in select_targets(linears, targets, exclude)]


def add_lora(model: torch.nn.Module, rank: int, alpha: float, targets, exclude: list[str]) -> list[str]:
    """Inject peft LoRA (A: kaiming, B: zeros) into ``model``; returns the adapted paths."""
    from peft import LoraConfig, inject_adapter_in_model

    names = target_modules(model, targets, exclude)
    if not names:
        raise ValueError(f"lora_targets={targets!r} with lora_exclude={exclude!r} selects no Linear layer")
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=names, lora_dropout=0.0,
                        init_lora_weights=True, bias="none")
    inject_adapter_in_model(config, model, adapter_name="default")
    for pname, param in model.named_parameters():
        param.requires_grad_("lora_" in pname)
        if "lora_" in pname:
            # float32 adapters: bf16 cannot hold lr-1e-5 updates (peft forward casts the input)
            param.data = param.data.float()
    return names


def lora_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n}


@contextlib.contextmanager
def gathered(params: list[torch.nn.Parameter]):
    """Full tensors of ZeRO-3 partitioned parameters (collective: every rank must enter)."""
    if params and hasattr(params[0], "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            yield
    else:
        yield


def _clean(name: str) -> str:
    """Strip wrappers' prefixes (DeepSpeed/DDP ``module.``, torch.compile ``_orig_mod.``)."""
    for prefix in ("module.", "_orig_mod."):
        while name.startswith(prefix):
            name = name[len(prefix):]
    return name


def lora_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """LoRA parameters by (clean) parameter name, float32 CPU copies (gathers under ZeRO-3)."""
    params = lora_parameters(model)
    with gathered(list(params.values())):
        return {_clean(n): p.detach().float().cpu().clone() for n, p in params.items()}


def load_lora_state(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    params = {_clean(n): p for n, p in lora_parameters(model).items()}
    missing = set(params) - set(state)
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} LoRA tensors, e.g. {sorted(missing)[:2]}")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(state[name].to(param.dtype))


def native_modules(state: Mapping[str, torch.Tensor], alpha: float) -> dict[str, tuple]:
    """peft state {path.lora_A.default.weight: ...} -> {native path: (up, down, alpha)}."""
    downs, ups = {}, {}
    for name, tensor in state.items():
        if ".lora_A." in name:
            downs[name.split(".lora_A.")[0]] = tensor
        elif ".lora_B." in name:
            ups[name.split(".lora_B.")[0]] = tensor
    out = {}
    for path, down in downs.items():
        native = diffusers_to_native(path)
        if native is None:
            raise ValueError(f"no native Wan name for the adapted module {path}")
        out[native] = (ups[path], down, alpha)
    return out


def set_lora_weights(model: torch.nn.Module, modules: Mapping[str, tuple]) -> None:
    """Give the injected adapters the weights of a LoRA: ``modules`` is {native path: (up, down,
    alpha)} (e.g. ``LoadedLora.as_modules()``); every adapted module must be in it. Called before
    the model is handed to DeepSpeed (the parameters are whole then)."""
    params = lora_parameters(model)
    by_native: dict[str, dict[str, torch.nn.Parameter]] = {}
    for name, param in params.items():
        path, part = (name.split(".lora_A.")[0], "down") if ".lora_A." in name else (name.split(".lora_B.")[0], "up")
        by_native.setdefault(diffusers_to_native(_clean(path)), {})[part] = param
    missing = sorted(set(by_native) - set(modules))
    if missing:
        raise ValueError(f"the LoRA lacks {len(missing)} adapted modules, e.g. {missing[:3]}")
    with torch.no_grad():
        for native, parts in by_native.items():
            up, down, _ = modules[native]
            parts["up"].copy_(up.to(parts["up"].dtype).reshape(parts["up"].shape))
            parts["down"].copy_(down.to(parts["down"].dtype).reshape(parts["down"].shape))


@contextlib.contextmanager
def adapters_disabled(model: torch.nn.Module):
    """The model without its LoRA (the base model), for a no-grad pass: peft's per-layer switch,
    set directly because ``enable_adapters`` also flips ``requires_grad``, which must not change
    under an optimizer that holds these parameters."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    if not layers or not all(hasattr(m, "_disable_adapters") for m in layers):
        raise RuntimeError("no peft LoRA layers with a disable switch in the model (peft changed?)")
    for layer in layers:
        layer._disable_adapters = True
    try:
        yield model
    finally:
        for layer in layers:
            layer._disable_adapters = False
