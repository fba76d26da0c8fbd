"""Wan Dual LoRA Loader node (work in progress: the node lands in the next commit)."""

NODES: list = []
