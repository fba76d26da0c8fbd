"""Every model file a run will read, checked from its contents before anything starts.

The trainer's config validation and the ComfyUI Train node both call ``check_input_files``:
the node before it unloads ComfyUI's models or launches anything, the trainer before it
loads a model. Each file is judged by its header and keys (safetensors headers, memory-mapped
zip checkpoints), never by its name and never by a full load. A refusal is a ``ConfigError``
naming the config field, the file, what was found and what to do.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..safe_io import TensorIndex, UserFileError, tensor_index
from .config import ConfigError, TrainConfig

_EXPERT_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.")
EXPERT_CHANNELS = {16: "T2V", 36: "I2V / Fun-InP"}
_UNSUPPORTED_QUANT = (".weight_scale", ".input_scale")


@dataclass(frozen=True)
class ExpertShape:
    """What the trainer needs to know of a Wan expert, read from its header."""

    in_channels: int
    dim: int
    num_layers: int
    text_dim: int
    tensors: dict = field(default_factory=dict, compare=False, repr=False)  # native key -> TensorInfo

    @property
    def linear_modules(self) -> list[str]:
        """Native paths of the Linear layers (every 2-D ``.weight`` of a Wan transformer)."""
        return [k[: -len(".weight")] for k, v in self.tensors.items() if k.endswith(".weight") and len(v.shape) == 2]


def _index(field_name: str, path: str, what: str, **kwargs) -> TensorIndex:
    try:
        return tensor_index(path, what, **kwargs)
    except UserFileError as exc:
        raise ConfigError(field_name, str(exc)) from None


def _looks_like(keys) -> str:
    """A short guess of what a file holds, for refusals."""
    keys = list(keys)
    if any("lora_" in k or ".alpha" in k for k in keys[:200]):
        return "a LoRA (it belongs in the loras folder)"
    if any(k.startswith(("encoder.conv1", "decoder.", "first_stage_model.")) for k in keys):
        return "a VAE (it belongs in the vae folder)"
    if any(k.startswith(("encoder.block.", "shared.")) for k in keys):
        return "a text encoder (it belongs in the text_encoders folder)"
    if any(k.startswith(("visual.", "vision_model.", "model.vision_model.")) for k in keys):
        return "a CLIP / reward model (it belongs in the reward_models folder)"
    return f"{len(keys)} tensors such as {sorted(keys)[:3]}"


def expert_shape(field_name: str, path: str) -> ExpertShape:
    """Refuse a file that is not a Wan2.x transformer in ComfyUI/original layout."""
    index = _index(field_name, path, "Wan expert")
    keys = index.tensors
    prefix = next((p for p in _EXPERT_PREFIXES if any(k.startswith(p + "blocks.") for k in keys)), "")
    native = {k[len(prefix):]: v for k, v in keys.items() if k.startswith(prefix)}
    needed = ("patch_embedding.weight", "text_embedding.0.weight", "time_embedding.0.weight",
              "blocks.0.self_attn.q.weight", "head.head.weight")
    missing = [k for k in needed if k not in native]
    if missing:
        raise ConfigError(field_name, f"{path} is not a Wan transformer in ComfyUI/original layout (no "
                          f"{missing[0]!r}; found {_looks_like(keys)}); choose an expert file from "
                          "models/diffusion_models")
    quant = next((k for k in keys if k.endswith(_UNSUPPORTED_QUANT)), None)
    if quant:
        raise ConfigError(field_name, f"{path}: key {quant!r} belongs to a quantisation format this trainer does "
                          "not read (only ComfyUI's fp8 'scaled' files with scale_weight); use the bf16, fp16, "
                          "fp8_e4m3fn or fp8_scaled file of this model")
    patch = native["patch_embedding.weight"].shape
    if len(patch) != 5:
        raise ConfigError(field_name, f"{path}: patch_embedding.weight has shape {list(patch)}, not the 5-D "
                          "Conv3d of a Wan video transformer; choose a Wan2.2 A14B expert")
    layers = 1 + max(int(k.split(".")[1]) for k in native if k.startswith("blocks.") and k.split(".")[1].isdigit())
    shape = ExpertShape(in_channels=patch[1], dim=patch[0], num_layers=layers,
                        text_dim=native["text_embedding.0.weight"].shape[1], tensors=native)
    if shape.in_channels not in EXPERT_CHANNELS:
        raise ConfigError(field_name, f"{path} has {shape.in_channels} input channels; supported: 16 (T2V) and "
                          "36 (I2V / Fun-InP). Wan2.2 TI2V-5B and other variants cannot be trained here")
    if shape.dim % 128:
        raise ConfigError(field_name, f"{path}: model width {shape.dim} is not a multiple of the Wan head size 128")
    return shape


def check_experts(cfg: TrainConfig, text_dim: int | None) -> dict[str, ExpertShape]:
    """Both experts are Wan transformers of one family and width that read ``text_dim`` wide text."""
    shapes = {name: expert_shape(f"{name}_noise_model", getattr(cfg, f"{name}_noise_model"))
              for name in ("high", "low")}
    high, low = shapes["high"], shapes["low"]
    if (high.in_channels, high.dim) != (low.in_channels, low.dim):
        raise ConfigError("low_noise_model", f"the high-noise expert {cfg.high_noise_model} is "
                          f"{EXPERT_CHANNELS[high.in_channels]} ({high.in_channels} input channels) of width "
                          f"{high.dim} and the low-noise expert {cfg.low_noise_model} "
                          f"{EXPERT_CHANNELS[low.in_channels]} ({low.in_channels} input channels) of width {low.dim}: both "
                          "must be the two experts of one model (both T2V or both I2V / Fun-InP, same size)")
    if text_dim is not None:
        for name, shape in shapes.items():
            if shape.text_dim != text_dim:
                source = "prompt_embeddings" if cfg.prompt_embeddings else "text_encoder"
                raise ConfigError(f"{name}_noise_model", f"{getattr(cfg, f'{name}_noise_model')} reads text "
                                  f"embeddings of width {shape.text_dim} but {source} ({getattr(cfg, source)}) "
                                  f"gives {text_dim}; use the umt5-xxl encoder (4096) or embeddings computed "
                                  "with it")
    return shapes


def check_vae(cfg: TrainConfig) -> None:
    index = _index("vae", cfg.vae, "VAE")
    keys = {k[len("first_stage_model."):] if k.startswith("first_stage_model.") else k: v
            for k, v in index.tensors.items()}
    if "conv2.weight" not in keys or not any(k.startswith("decoder.") for k in keys):
        raise ConfigError("vae", f"{cfg.vae} is not a Wan2.1 VAE in ComfyUI/original layout (found "
                          f"{_looks_like(keys)}); choose wan_2.1_vae.safetensors from models/vae")
    z_dim = keys["conv2.weight"].shape[0]
    if z_dim != 16:
        raise ConfigError("vae", f"{cfg.vae} has {z_dim} latent channels; Wan2.2 A14B needs the Wan2.1 VAE (16 "
                          "channels), not the Wan2.2 VAE of the 5B model")


def check_prompt_embeddings(cfg: TrainConfig) -> int:
    """The embeddings file's width, after checking it holds one tensor per listed prompt."""
    import json

    index = _index("prompt_embeddings", cfg.prompt_embeddings, "prompt embeddings")
    try:
        prompts = json.loads(index.metadata["prompts"])
    except (KeyError, ValueError):
        raise ConfigError("prompt_embeddings", f"{cfg.prompt_embeddings} has no readable 'prompts' metadata (found "
                          f"{_looks_like(index.tensors)}); write it with "
                          "training.trainer.models.write_prompt_embeddings or connect the text encoder") from None
    widths = set()
    for i in range(len(prompts)):
        info = index.tensors.get(f"emb.{i}")
        if info is None or len(info.shape) != 2:
            raise ConfigError("prompt_embeddings", f"{cfg.prompt_embeddings} lists {len(prompts)} prompts but has no "
                              f"[tokens, width] tensor emb.{i}; recompute the embeddings file")
        widths.add(info.shape[1])
    if len(widths) != 1:
        raise ConfigError("prompt_embeddings", f"{cfg.prompt_embeddings} mixes embedding widths {sorted(widths)}; "
                          "recompute it with one text encoder")
    return widths.pop()


def check_text_encoder(cfg: TrainConfig) -> int:
    """The umT5 encoder's width, after checking its keys (and its embedded tokenizer)."""
    index = _index("text_encoder", cfg.text_encoder, "umt5 text encoder")
    keys = index.tensors
    embed = keys.get("shared.weight") or keys.get("encoder.embed_tokens.weight")
    if embed is None or "encoder.block.0.layer.0.SelfAttention.q.weight" not in keys:
        raise ConfigError("text_encoder", f"{cfg.text_encoder} is not a umT5 encoder (found {_looks_like(keys)}); "
                          "choose umt5_xxl_fp16 / fp8 from models/text_encoders")
    if not cfg.tokenizer and "spiece_model" not in keys:
        raise ConfigError("tokenizer", f"{cfg.text_encoder} has no embedded tokenizer (ComfyUI's umt5 files do): "
                          "give the folder of the google/umt5-xxl tokenizer")
    return embed.shape[1]


def check_rewards(cfg: TrainConfig) -> None:
    """Each reward file is a reward model of the kind its spec names (kind from its keys)."""
    from ..rewards.registry import checkpoint_kind

    for group in ("rewards", "held_out_rewards"):
        for i, spec in enumerate(getattr(cfg, group)):
            try:
                kind = checkpoint_kind(spec.path)
            except UserFileError as exc:
                raise ConfigError(f"{group}[{i}].path", str(exc)) from None
            if kind != spec.model:
                raise ConfigError(f"{group}[{i}].model", f"is {spec.model!r} but {spec.path} is a {kind} checkpoint "
                                  "(judged from its keys); fix model or path")


def check_lora_for(field_name: str, path: str, expert: ExpertShape, expert_name: str):
    """A LoRA of plain up/down pairs whose every module fits ``expert`` (names and shapes)."""
    from ..lora_format import read_lora
    from ..lora_match import match_lora

    try:
        lora = read_lora(path)
        modules = lora.as_modules()
    except UserFileError as exc:
        raise ConfigError(field_name, str(exc)) from None
    report = match_lora(lora, expert.tensors, expert=expert_name)
    if report.shape_mismatches or report.unmatched or not report.matched:
        problem = (f"shape mismatch {report.shape_mismatches[0]}" if report.shape_mismatches else
                   f"{len(report.unmatched)} keys match no module of the expert, e.g. {list(report.unmatched)[:3]}"
                   if report.unmatched else "no module matches")
        raise ConfigError(field_name, f"{path} does not fit the {expert_name}-noise expert ({problem}); it is a "
                          "LoRA for another model: choose a Wan2.2 A14B LoRA of this expert")
    return modules


def check_init_lora(cfg: TrainConfig, expert: ExpertShape) -> tuple[int, float]:
    """The initial LoRA's (rank, alpha) after checking it can start this run: one rank, equal to
    lora_rank, and exactly the run's target modules."""
    from .lora import select_targets

    modules = check_lora_for("init_lora", cfg.init_lora, expert, cfg.expert)
    ranks = {down.shape[0] for _, down, _ in modules.values()}
    alphas = {alpha if alpha is not None else float(down.shape[0]) for _, down, alpha in modules.values()}
    if len(ranks) != 1 or len(alphas) != 1:
        raise ConfigError("init_lora", f"{cfg.init_lora} mixes ranks {sorted(ranks)} / alphas {sorted(alphas)}; "
                          "training continues a LoRA of one rank and alpha")
    rank, alpha = ranks.pop(), alphas.pop()
    if rank != cfg.lora_rank:
        raise ConfigError("lora_rank", f"is {cfg.lora_rank} but init_lora {cfg.init_lora} has rank {rank}: set "
                          f"lora_rank to {rank} (a LoRA continues at its own rank)")
    targets = set(select_targets(expert.linear_modules, cfg.lora_targets, cfg.lora_exclude))
    missing, extra = sorted(targets - set(modules)), sorted(set(modules) - targets)
    if missing:
        raise ConfigError("init_lora", f"{cfg.init_lora} lacks {len(missing)} of the run's target modules "
                          f"(lora_targets={cfg.lora_targets!r}, lora_exclude={cfg.lora_exclude!r}), e.g. "
                          f"{missing[:4]}; set lora_targets / lora_exclude to the file's modules")
    if extra:
        raise ConfigError("init_lora", f"{cfg.init_lora} has {len(extra)} modules the run would not train, e.g. "
                          f"{extra[:4]}; widen lora_targets or drop those names from lora_exclude")
    return rank, alpha


def check_start_images(cfg: TrainConfig, expert: ExpertShape) -> None:
    """Start images exist only for I2V / Fun-InP experts, and validation then has its own."""
    from .conditioning import read_start_images

    for name in ("start_images", "validation_start_images"):
        path = getattr(cfg, name)
        if not path:
            continue
        if expert.in_channels != 36:
            raise ConfigError(name, f"the experts are {EXPERT_CHANNELS[expert.in_channels]} (16 input channels): "
                              "start images condition I2V / Fun-InP experts (36 channels) only; drop them")
        try:
            read_start_images(path, count_only=True)
        except UserFileError as exc:
            raise ConfigError(name, str(exc)) from None
    if cfg.start_images and cfg.validation_every and not cfg.validation_start_images:
        raise ConfigError("validation_start_images", "is empty but start_images are set and validation runs: give "
                          "held-out start images for the validation prompts (validation never scores training "
                          "images)")


def check_input_files(cfg: TrainConfig) -> dict[str, ExpertShape]:
    """Check every model file of ``cfg`` from its contents; returns the experts' shapes."""
    text_dim = check_prompt_embeddings(cfg) if cfg.prompt_embeddings else None
    if cfg.text_encoder:
        text_dim = check_text_encoder(cfg)
    shapes = check_experts(cfg, text_dim)
    check_vae(cfg)
    check_rewards(cfg)
    if cfg.init_lora:
        check_init_lora(cfg, shapes[cfg.expert])
    if cfg.frozen_expert_lora:
        other = "low" if cfg.expert == "high" else "high"
        check_lora_for("frozen_expert_lora", cfg.frozen_expert_lora, shapes[other], other)
    check_start_images(cfg, shapes["low"])
    return shapes
