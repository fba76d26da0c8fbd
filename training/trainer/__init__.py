"""Reward-backpropagation LoRA trainer for Wan2.2 A14B experts (accelerate + DeepSpeed).

Entry: ``training/train_reward_lora.py --config run.yaml`` (by path, under ``accelerate
launch``) or ``python -m training.trainer.cli --config run.yaml``. Modules: config (schema),
models (loading), sampler (trajectory + backprop window), loop (the training step),
checkpoint (exact resume), progress (events, control), preflight (environment checks).
"""
