// Generated from training/trainer/progress.py (python -m training.trainer.progress --js); a test keeps
// this file equal to it. The progress events the node forwards, with their fields.
export const EVENT_FIELDS = {
  "started": [
    "adapted_modules",
    "batch_size",
    "config_hash",
    "deepspeed",
    "effective_batch",
    "expert",
    "frozen_local_fraction",
    "gradient_accumulation_steps",
    "gradient_clipping",
    "init_lora",
    "lora_alpha",
    "lora_params_partitioned",
    "lora_path",
    "lora_rank",
    "max_steps",
    "memory_at_start_mb",
    "memory_mode",
    "memory_reason",
    "offload_optimizer_device",
    "offload_param_device",
    "output_dir",
    "recipe",
    "replaced_checkpoints",
    "resumed_from",
    "start_images",
    "step",
    "world_size",
    "zero_stage"
  ],
  "step": [
    "eta_seconds",
    "grad_norm",
    "loss",
    "lr",
    "max_steps",
    "motion_term",
    "peak_memory_mb",
    "reward",
    "rewards",
    "seconds",
    "step"
  ],
  "checkpoint": [
    "lora_path",
    "path",
    "reason",
    "step"
  ],
  "validation": [
    "best",
    "best_lora_path",
    "best_score",
    "best_step",
    "criterion",
    "criterion_value",
    "held_out",
    "motion",
    "rewards",
    "step"
  ],
  "sample": [
    "paths",
    "step"
  ],
  "warning": [
    "message",
    "step"
  ],
  "finished": [
    "average_lora_path",
    "best_lora_path",
    "lora_path",
    "reason",
    "step"
  ],
  "error": [
    "field",
    "kind",
    "message",
    "step"
  ],
  "checked": [
    "config",
    "config_hash",
    "memory",
    "memory_mode",
    "memory_reason",
    "overrides"
  ],
  "plan": [
    "phase",
    "text"
  ],
  "cancelled": [
    "message"
  ]
};
