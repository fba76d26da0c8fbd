"""Load the model stack from ComfyUI-format files into diffusers / transformers models.

- Wan experts: ComfyUI ``diffusion_models`` files (bf16, fp16, fp8_e4m3fn and fp8 "scaled"
  files with ``scale_weight`` keys, dequantised here as ComfyUI does) -> diffusers' single-file conversion
  ``convert_wan_transformer_to_diffusers`` -> ``WanTransformer3DModel`` whose config is read
  from the tensor shapes (``from_single_file`` would fetch a config from the hub).
- Wan2.1 VAE (ComfyUI ``vae`` format) -> ``convert_wan_vae_to_diffusers`` -> ``AutoencoderKLWan``.
- Text: precomputed umT5 embeddings (safetensors written by ``write_prompt_embeddings``), or a
  umt5-xxl encoder file run once through transformers' ``UMT5EncoderModel``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from ..safe_io import UserFileError, read_state_dict, safetensors_metadata, save_safetensors

TEXT_LEN = 512  # Wan pads every prompt embedding to 512 tokens
_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.")
_FP8 = tuple(getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, name))


def dequantize(sd: Mapping[str, torch.Tensor], dtype: torch.dtype, what: str = "file",
               keep_fp8: dict | None = None) -> dict[str, torch.Tensor]:
    """Cast to ``dtype``, applying ComfyUI's fp8 "scaled" convention (comfy/ops.py
    ``scaled_fp8_ops``): a ``<m>.weight`` with a ``<m>.scale_weight`` is ``weight * scale_weight``
    (torch broadcasting, as ComfyUI multiplies); ``<m>.scale_input`` only scales the input of
    ComfyUI's fp8 matmul, whose result equals the dequantised weight's, so it is dropped; the
    ``scaled_fp8`` marker is dropped. Other quantisation scales (``.weight_scale``,
    ``.input_scale``: formats ComfyUI 0.3.64 does not read either) are refused, naming the key.

    ``keep_fp8``: a dict to fill instead of dequantising the fp8 Linear weights of the blocks (over
    99 % of an expert's; diffusers casts the timestep to the time embedding's weight dtype, so the
    top-level layers are dequantised): they stay fp8
    (``stream.StreamedLinear`` casts them at use) and ``keep_fp8[<m>]`` gets each one's scale (or
    None). A tensor already in ``dtype`` is returned as it is (a memory-mapped file stays shared)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key.endswith((".weight_scale", ".input_scale")):
            raise UserFileError(f"{what}: key {key!r} belongs to a quantisation format this trainer does not read "
                                "(only ComfyUI's fp8 'scaled' files with scale_weight); use the bf16, fp16, "
                                "fp8_e4m3fn or fp8_scaled file of this model")
        if key == "scaled_fp8" or key.endswith(("scaled_fp8", ".scale_weight", ".scale_input")):
            continue
        scale = sd.get(key[: -len(".weight")] + ".scale_weight") if key.endswith(".weight") else None
        if (keep_fp8 is not None and value.dtype in _FP8 and value.ndim == 2 and key.endswith(".weight")
                and key.startswith("blocks.")):  # the blocks' Linears (the models cast inputs to the others' dtype)
            keep_fp8[key[: -len(".weight")]] = None if scale is None else scale.float()
            out[key] = value
            continue
        if scale is not None:
            try:
                value = value.float() * scale.float()
            except RuntimeError as exc:
                raise UserFileError(f"{what}: {key[:-len('.weight')]}.scale_weight of shape {tuple(scale.shape)} "
                                    f"does not broadcast over the weight {tuple(value.shape)} as ComfyUI "
                                    "multiplies it; not a ComfyUI fp8 scaled file") from exc
        out[key] = value.to(dtype)
    return out


def strip_prefix(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in _PREFIXES:
        if any(k.startswith(prefix + "blocks.") for k in sd):
            return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return dict(sd)


def wan_config_from_state_dict(sd: Mapping[str, torch.Tensor], path: str = "") -> dict:
    """diffusers WanTransformer3DModel config from a native state dict's shapes."""
    try:
        patch = sd["patch_embedding.weight"]
        dim, in_dim = patch.shape[:2]
        patch_size = tuple(patch.shape[2:])
        num_layers = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
        head = sd["head.head.weight"]
        out_dim = head.shape[0] // (patch_size[0] * patch_size[1] * patch_size[2])
        config = dict(
            patch_size=patch_size, num_attention_heads=dim // 128, attention_head_dim=128,
            in_channels=in_dim, out_channels=out_dim, text_dim=sd["text_embedding.0.weight"].shape[1],
            freq_dim=sd["time_embedding.0.weight"].shape[1], ffn_dim=sd["blocks.0.ffn.0.weight"].shape[0],
            num_layers=num_layers, cross_attn_norm="blocks.0.norm3.weight" in sd,
            qk_norm="rms_norm_across_heads", eps=1e-6,
        )
    except (KeyError, ValueError, IndexError) as exc:
        raise UserFileError(f"{path or 'expert file'} is not a Wan transformer in ComfyUI/original format "
                            f"(missing or odd key: {exc}); choose a file from models/diffusion_models") from exc
    if dim % 128:
        raise UserFileError(f"{path}: model width {dim} is not a multiple of the Wan head size 128")
    if "img_emb.proj.1.weight" in sd:
        config["image_dim"] = sd["img_emb.proj.1.weight"].shape[1]
        config["added_kv_proj_dim"] = dim
    return config


def _build(cls, config: dict, sd: dict, what: str):
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = cls(**config) if isinstance(config, dict) else cls(config)
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    if missing or unexpected:
        raise UserFileError(f"{what}: {len(missing)} missing and {len(unexpected)} unexpected keys after "
                            f"conversion (first: {(missing or unexpected)[:3]}); is this the right kind of file?")
    return model


def load_wan_expert(path: str | os.PathLike, dtype: torch.dtype = torch.bfloat16,
                    merge_lora: tuple[str, float] | None = None, keep_fp8: bool = False):
    """A ComfyUI-format Wan expert as a frozen diffusers ``WanTransformer3DModel`` (eval, CPU).

    The file's tensors are memory-mapped (safetensors): weights already in ``dtype`` are not copied,
    so the processes of a machine share them. ``keep_fp8``: fp8 Linear weights stay fp8 and
    ``model.fp8_scales`` maps each such Linear (diffusers path) to its scale or None; the caller
    must then wrap those layers (``stream.stream_linears``) before a forward. ``merge_lora``: (LoRA
    file, strength) merged into the weights, ``W + s * alpha/rank * up @ down`` as ComfyUI applies
    it (for a frozen expert: exact, and no adapters to run)."""
    from diffusers import WanTransformer3DModel
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    from ..wan_names import diffusers_to_native

    kept: dict | None = {} if keep_fp8 else None
    native = dequantize(strip_prefix(read_state_dict(path, "Wan expert")), dtype, f"Wan expert {path}", kept)
    kept = kept or {}
    if merge_lora is not None:
        from ..lora_format import read_lora
        from ..lora_match import merged_weights

        merged = merged_weights(native, read_lora(merge_lora[0]), merge_lora[1])
        native.update({k: v.to(dtype) for k, v in merged.items()})
        kept = {m: s for m, s in kept.items() if f"{m}.weight" not in merged}  # merged weights are in dtype now
    config = wan_config_from_state_dict(native, str(path))
    converted = convert_wan_transformer_to_diffusers(dict(native))
    model = _build(WanTransformer3DModel, config, converted, f"Wan expert {path}")
    model.fp8_scales = {name: kept[diffusers_to_native(name)] for name, module in model.named_modules()
                        if isinstance(module, torch.nn.Linear) and diffusers_to_native(name) in kept}
    return model.requires_grad_(False).eval()  # tensors already in dtype (no .to(): keeps fp32 buffers)


def vae_config_from_state_dict(sd: Mapping[str, torch.Tensor], path: str = "") -> dict:
    try:
        base_dim = sd["encoder.conv1.weight"].shape[0] if "encoder.conv1.weight" in sd else sd["decoder.head.2.weight"].shape[1]
        z_dim = sd["conv2.weight"].shape[0]
    except KeyError as exc:
        raise UserFileError(f"{path or 'VAE file'} is not a Wan2.1 VAE in ComfyUI/original format "
                            f"(missing {exc}); choose Wan2.1_VAE / wan_2.1_vae.safetensors") from exc
    if z_dim != 16:
        raise UserFileError(f"{path}: VAE latent channels {z_dim}; Wan2.2 A14B needs the Wan2.1 VAE (16)")
    return dict(base_dim=base_dim, z_dim=z_dim)


def load_wan_vae(path: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """A ComfyUI-format Wan2.1 VAE as a frozen diffusers ``AutoencoderKLWan``."""
    from diffusers import AutoencoderKLWan
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    native = dequantize(read_state_dict(path, "VAE"), dtype, f"VAE {path}")
    native = {k[len("first_stage_model."):] if k.startswith("first_stage_model.") else k: v for k, v in native.items()}
    config = vae_config_from_state_dict(native, str(path))
    model = _build(AutoencoderKLWan, config, convert_wan_vae_to_diffusers(native), f"VAE {path}")
    return model.requires_grad_(False).eval()


def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Normalised Wan latents [B,16,T,h,w] -> frames [B,3,F,H,W] in [0, 1] (differentiable)."""
    mean = torch.tensor(vae.config.latents_mean, device=latents.device, dtype=torch.float32).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std, device=latents.device, dtype=torch.float32).view(1, -1, 1, 1, 1)
    z = latents.float() * std + mean
    dtype = next(vae.parameters()).dtype
    video = vae.decode(z.to(dtype), return_dict=False)[0].float()
    return (video.clamp(-1, 1) / 2 + 0.5).clamp(0, 1)


# ---- text embeddings ------------------------------------------------------------------

def write_prompt_embeddings(path: str | os.PathLike, embeddings: Mapping[str, torch.Tensor]) -> Path:
    """Precomputed prompt embeddings file: tensor ``emb.<i>`` [L_i, D] per prompt; metadata
    ``prompts`` = JSON list of the prompts in index order (include "" for CFG's negative)."""
    prompts = list(embeddings)
    tensors = {f"emb.{i}": embeddings[p].float().contiguous() for i, p in enumerate(prompts)}
    return save_safetensors(tensors, path, metadata={"prompts": json.dumps(prompts), "format": "wan_prompt_embeddings"})


def prompts_in_embeddings(path: str | os.PathLike) -> list[str]:
    """Prompt list of an embeddings file (header only, no tensors read)."""
    meta = safetensors_metadata(path, "prompt embeddings")
    if "prompts" not in meta:
        raise UserFileError(f"prompt embeddings {path} has no 'prompts' metadata; write it with "
                            "training.trainer.models.write_prompt_embeddings")
    return json.loads(meta["prompts"])


def read_prompt_embeddings(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    prompts = prompts_in_embeddings(path)
    tensors = read_state_dict(path, "prompt embeddings")
    return {p: tensors[f"emb.{i}"] for i, p in enumerate(prompts)}


def _tokenize(prompt: str, spiece, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """ids and mask [1, TEXT_LEN]: the prompt's pieces, then </s> (id 1), padded with 0."""
    if spiece is not None:
        ids = spiece.encode(prompt)[: TEXT_LEN - 1] + [1]
    else:
        ids = tokenizer(prompt, truncation=True, max_length=TEXT_LEN, add_special_tokens=True)["input_ids"]
    out = torch.zeros(1, TEXT_LEN, dtype=torch.long)
    mask = torch.zeros(1, TEXT_LEN, dtype=torch.long)
    out[0, : len(ids)] = torch.tensor(ids)
    mask[0, : len(ids)] = 1
    return out, mask


def encode_prompts_umt5(prompts: list[str], encoder_path: str, tokenizer_dir: str | None,
                        device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Run the umt5-xxl encoder once over every prompt; embeddings cut to their true length.

    The tokenizer is the sentencepiece model embedded in ComfyUI's umt5 files, or a
    tokenizer folder (``tokenizer``) for files without one.
    """
    from transformers import UMT5Config, UMT5EncoderModel

    raw = read_state_dict(encoder_path, "umt5 text encoder")
    spiece_bytes = raw.pop("spiece_model", None)
    spiece = tokenizer = None
    if tokenizer_dir:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    elif spiece_bytes is not None:
        import sentencepiece

        spiece = sentencepiece.SentencePieceProcessor(model_proto=spiece_bytes.numpy().tobytes())
    else:
        raise UserFileError(f"{encoder_path} has no embedded tokenizer (spiece_model): set 'tokenizer' to the "
                            "folder of the google/umt5-xxl tokenizer")
    sd = dequantize(raw, dtype, f"umt5 text encoder {encoder_path}")
    sd = {k: v for k, v in sd.items() if not k.startswith(("decoder.", "lm_head"))}
    if "shared.weight" not in sd and "encoder.embed_tokens.weight" in sd:
        sd["shared.weight"] = sd["encoder.embed_tokens.weight"]
    try:
        vocab, d_model = sd["shared.weight"].shape
        num_layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.block."))
        q = sd["encoder.block.0.layer.0.SelfAttention.q.weight"]
        num_heads = sd["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"].shape[1]
        d_ff = sd["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"].shape[0]
    except KeyError as exc:
        raise UserFileError(f"{encoder_path} is not a umt5 encoder (missing {exc}); choose "
                            "umt5_xxl_fp16/fp8 from models/text_encoders") from exc
    config = UMT5Config(vocab_size=vocab, d_model=d_model, d_kv=q.shape[0] // num_heads, d_ff=d_ff,
                        num_layers=num_layers, num_heads=num_heads, feed_forward_proj="gated-gelu")
    sd.setdefault("encoder.embed_tokens.weight", sd["shared.weight"])
    model = _build(UMT5EncoderModel, config, sd, f"umt5 {encoder_path}")
    model = model.requires_grad_(False).eval().to(device)
    out = {}
    with torch.no_grad():
        for prompt in dict.fromkeys(prompts):
            ids, mask = _tokenize(prompt, spiece, tokenizer)
            hidden = model(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
            out[prompt] = hidden[0, : int(mask.sum())].float().cpu()
    del model
    return out


def pad_context(embeds: list[torch.Tensor], length: int = TEXT_LEN) -> torch.Tensor:
    """List of [L_i, D] -> [B, length, D], zero-padded as Wan does."""
    dim = embeds[0].shape[-1]
    out = embeds[0].new_zeros(len(embeds), length, dim)
    for i, e in enumerate(embeds):
        n = min(length, e.shape[0])
        out[i, :n] = e[:n]
    return out
