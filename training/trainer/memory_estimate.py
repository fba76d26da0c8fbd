"""The memory estimate of each memory mode (placement.py says what the modes are).

One estimator serves the preflight check, the Train node, ``--check-only`` and the README's
table "what trains on which GPUs" (``placement.readme_table``; a test keeps the README equal
to it). Weights are counted from the safetensors headers at the
dtype they have in memory: a file whose dtype is the run's (and an fp8 file, which stays fp8)
is memory-mapped and shared by the processes of a machine; the trained expert is cast to the
run's dtype when it goes to DeepSpeed. The figures are upper estimates, made to refuse what
cannot fit and to choose a mode, not measurements.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .config import TrainConfig

GIB = 2 ** 30
MODES = ("fast", "sharded", "low")  # fastest first: what "auto" tries in order
REWARD_PARAMS = {"hps": 0.99e9, "mps": 1.1e9, "pickscore": 0.99e9, "aesthetic": 0.43e9}
UMT5_PARAMS = 5.7e9
ZERO3_LIVE_PARAMS = 1e9  # stage3_max_live_parameters of our ZeRO-3 presets: the gather buffer's bound
PROCESS_OVERHEAD_GIB = 3.0  # host memory of one trainer process besides the weights (torch, CUDA, libraries)
GPU_MARGIN_GIB = 1.5  # CUDA context, allocator fragmentation
_FILE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1}


@dataclass(frozen=True)
class ExpertSize:
    """One expert, counted from its file's header."""

    params: int  # every floating value
    linear_params: int  # those of the Linear layers (streamed in low mode, castable from fp8)
    largest_linear: int  # values of the largest Linear weight (the streaming buffer's size)
    file_bytes_per_value: int  # 1 (fp8), 2 (bf16/fp16) or 4 (fp32)
    dim: int
    ffn: int
    layers: int


@dataclass(frozen=True)
class RunSize:
    """Everything the estimate needs about a run."""

    trained: ExpertSize
    frozen: ExpertSize
    compute_bytes: int  # 2 (bf16/fp16) or 4 (float32)
    lora_params: int
    tokens: int  # transformer tokens of one window forward (CFG doubles them)
    vae_params: int
    reward_params: float
    umt5_params: float
    checkpointing: bool


@dataclass(frozen=True)
class DeepSpeedShape:
    """What the DeepSpeed preset does with the trained expert (stage 0 = no DeepSpeed)."""

    stage: int = 0
    offload_param: bool = False
    offload_optimizer: bool = False


@dataclass
class Estimate:
    mode: str
    processes: int
    per_machine: int
    gpu_gib: float  # per GPU, at the peak
    host_gib: float  # per machine, at the peak (shared file pages counted once)
    parts: dict[str, float] = field(default_factory=dict)  # what the GPU figure is made of


# ---- sizes from the files ---------------------------------------------------------------------

def expert_size(tensors: dict) -> ExpertSize:
    """From an expert's header (native keys -> TensorInfo)."""
    floating = {k: v for k, v in tensors.items() if v.dtype in _FILE_BYTES}
    linears = {k: v for k, v in floating.items() if k.endswith(".weight") and len(v.shape) == 2}
    weights = [v for k, v in linears.items() if k.startswith("blocks.")]
    widest = max(weights or linears.values(), key=lambda v: v.numel)
    dtype = max((v for v in linears.values()), key=lambda v: v.numel).dtype
    patch = tensors["patch_embedding.weight"].shape
    ffn = tensors["blocks.0.ffn.0.weight"].shape[0] if "blocks.0.ffn.0.weight" in tensors else 4 * patch[0]
    layers = 1 + max(int(k.split(".")[1]) for k in tensors if k.startswith("blocks.") and k.split(".")[1].isdigit())
    return ExpertSize(params=sum(v.numel for v in floating.values()), linear_params=sum(v.numel for v in linears.values()),
                      largest_linear=widest.numel, file_bytes_per_value=_FILE_BYTES[dtype], dim=patch[0], ffn=ffn,
                      layers=layers)


def lora_param_count(cfg: TrainConfig, trained_tensors: dict) -> int:
    """rank x (in + out) per adapted Linear of the trained expert."""
    from .lora import select_targets

    shapes = {k[: -len(".weight")]: v.shape for k, v in trained_tensors.items()
              if k.endswith(".weight") and len(v.shape) == 2}
    return sum(cfg.lora_rank * (shapes[m][0] + shapes[m][1])
               for m in select_targets(shapes, cfg.lora_targets, cfg.lora_exclude))


def run_size(cfg: TrainConfig, experts: dict | None = None) -> RunSize:
    """The sizes of ``cfg``'s run; ``experts``: {"high"/"low": ExpertShape} when already read."""
    from .input_files import expert_shape

    experts = experts or {n: expert_shape(f"{n}_noise_model", getattr(cfg, f"{n}_noise_model")) for n in ("high", "low")}
    trained_name = "high" if cfg.expert == "high" else "low"
    frozen_name = "low" if trained_name == "high" else "high"
    vae_params = 127_000_000  # Wan2.1 VAE (the file is read whole anyway)
    rewards = sum(REWARD_PARAMS.get(s.model, 1e9) for s in cfg.rewards + cfg.held_out_rewards)
    tokens = cfg.latent_frames * (cfg.height // 16) * (cfg.width // 16) * cfg.batch_size
    tokens *= 2 if cfg.guidance_scale > 1 else 1
    return RunSize(trained=expert_size(experts[trained_name].tensors), frozen=expert_size(experts[frozen_name].tensors),
                   compute_bytes=4 if cfg.mixed_precision == "no" else 2,
                   lora_params=lora_param_count(cfg, experts[trained_name].tensors), tokens=tokens,
                   vae_params=vae_params, reward_params=rewards,
                   umt5_params=UMT5_PARAMS if cfg.text_encoder else 0.0, checkpointing=cfg.gradient_checkpointing)


# ---- the estimate ------------------------------------------------------------------------------

def _activations_gib(size: RunSize) -> float:
    """One window forward and its backward: with checkpointing the blocks' inputs plus one block's
    working set, without it every block's; plus the decode and the reward models' own."""
    e, cb, t = size.trained, size.compute_bytes, size.tokens
    block = t * (8 * e.dim + 2 * e.ffn) * cb
    saved = t * e.dim * cb * e.layers + 3 * block if size.checkpointing else block * e.layers
    return saved / GIB + 2.0


def _frozen_storage_bytes(size: RunSize) -> int:
    """Bytes per value of the frozen expert in memory: fp8 files stay fp8 (cast at use), others the
    run's dtype."""
    return 1 if size.frozen.file_bytes_per_value == 1 else size.compute_bytes


def estimate(size: RunSize, mode: str, processes: int, per_machine: int, ds: DeepSpeedShape) -> Estimate:
    """Peak GPU memory per GPU and host memory per machine of ``mode``."""
    cb, n = size.compute_bytes, max(processes, 1)
    lora = size.lora_params
    frozen_b = _frozen_storage_bytes(size)
    parts: dict[str, float] = {}
    if mode == "low":
        non_linear = (size.trained.params - size.trained.linear_params + size.frozen.params
                      - size.frozen.linear_params) * cb
        parts["experts (non-Linear weights; Linear weights stream)"] = non_linear / GIB
        parts["streaming buffers"] = 2 * max(size.trained.largest_linear, size.frozen.largest_linear) * cb / GIB
        parts["LoRA, gradients, AdamW"] = lora * 16 / GIB
    else:
        if mode == "sharded":
            parts["frozen expert (1/N)"] = size.frozen.params * cb / n / GIB
            parts["ZeRO-3 gather buffer (frozen)"] = min(ZERO3_LIVE_PARAMS, size.frozen.params) * cb / GIB
        else:
            parts["frozen expert"] = size.frozen.params * frozen_b / GIB
        if ds.stage == 3:
            parts["trained expert (ZeRO-3)"] = (0.0 if ds.offload_param else size.trained.params * cb / n) / GIB
            parts["ZeRO-3 gather buffer (trained)"] = min(ZERO3_LIVE_PARAMS, size.trained.params) * cb / GIB
            parts["LoRA and gradients"] = lora * 8 / n / GIB
        else:
            parts["trained expert"] = size.trained.params * cb / GIB
            parts["LoRA and gradients"] = lora * 8 / (n if ds.stage == 2 else 1) / GIB
        if not ds.offload_optimizer:
            parts["AdamW states"] = lora * 8 / (n if ds.stage else 1) / GIB
    parts["VAE"] = size.vae_params * cb / GIB
    parts["reward models"] = size.reward_params * cb / GIB
    parts["activations"] = _activations_gib(size)
    parts["margin"] = GPU_MARGIN_GIB
    gpu = sum(parts.values())
    gpu = max(gpu, size.umt5_params * cb / GIB + GPU_MARGIN_GIB)  # the text encoder runs alone, at the start
    host = _host_gib(size, mode, n, per_machine, ds)
    return Estimate(mode, n, per_machine, round(gpu, 2), round(host, 2), {k: round(v, 2) for k, v in parts.items()})


def _host_gib(size: RunSize, mode: str, n: int, per_machine: int, ds: DeepSpeedShape) -> float:
    """Host memory per machine: the experts' file pages once (memory-mapped, shared by the machine's
    processes), plus what each process holds itself."""
    cb = size.compute_bytes
    shared = (size.trained.params * size.trained.file_bytes_per_value
              + size.frozen.params * size.frozen.file_bytes_per_value)
    per_process = PROCESS_OVERHEAD_GIB * GIB + (size.vae_params + size.reward_params + size.umt5_params) * cb
    if mode == "low":
        if size.trained.file_bytes_per_value not in (1, cb):  # neither kept nor shared: cast copies
            per_process += size.trained.params * cb
        if size.frozen.file_bytes_per_value not in (1, cb):
            per_process += size.frozen.params * cb
        per_process += 2 * max(size.trained.largest_linear, size.frozen.largest_linear) * 4  # pinned staging
    else:
        if size.trained.file_bytes_per_value != cb:  # cast for DeepSpeed: a private copy while it partitions
            per_process += size.trained.params * cb
        if mode == "sharded" and size.frozen.file_bytes_per_value != cb:
            per_process += size.frozen.params * cb
        if ds.stage == 3 and ds.offload_param:
            per_process += size.trained.params * cb / n
        if ds.offload_optimizer:
            per_process += size.lora_params * 16 / n
    return (shared + per_machine * per_process) / GIB


def estimates(size: RunSize, processes: int, per_machine: int, ds: DeepSpeedShape) -> dict[str, Estimate]:
    """Every mode that can run with ``processes`` (sharded needs 2 or more, low exactly 1)."""
    out = {}
    for mode in MODES:
        if (mode == "sharded" and processes < 2) or (mode == "low" and processes != 1):
            continue
        out[mode] = estimate(size, mode, processes, per_machine, ds)
    return out


# ---- the A14B table ----------------------------------------------------------------------------

def a14b_size(frames: int = 81, width: int = 256, height: int = 256, rank: int = 128, file_bytes: int = 2,
              layers: int = 40) -> RunSize:
    """The reference configuration at A14B size (dim 5120, 40 blocks, 40 heads, ffn 13824), batch 1, CFG,
    bf16, HPS v2.1, from shapes alone (``layers``: fewer blocks, for benches on smaller GPUs)."""
    from ..safe_io import TensorInfo
    from ..tiny_models import wan_expert_shapes
    from .lora import select_targets

    dtype = {1: "F8_E4M3", 2: "BF16", 4: "F32"}[file_bytes]
    shapes = wan_expert_shapes(dim=5120, ffn_dim=13824, num_layers=layers, in_dim=36, text_dim=4096)
    tensors = {k: TensorInfo(dtype, v) for k, v in shapes.items()}
    expert = expert_size(tensors)
    linears = {k[: -len(".weight")]: v for k, v in shapes.items() if k.endswith(".weight") and len(v) == 2}
    lora = sum(rank * (linears[m][0] + linears[m][1]) for m in select_targets(linears, "all_linear", ["ffn"]))
    tokens = ((frames - 1) // 4 + 1) * (height // 16) * (width // 16) * 2
    return RunSize(trained=expert, frozen=expert, compute_bytes=2, lora_params=lora, tokens=tokens,
                   vae_params=127_000_000, reward_params=REWARD_PARAMS["hps"], umt5_params=0.0, checkpointing=True)


ZERO3_OFFLOAD = DeepSpeedShape(stage=3, offload_param=True, offload_optimizer=True)  # the default preset
