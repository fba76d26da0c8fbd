"""The interface every reward model implements (the trainer and the nodes code against it)."""

from __future__ import annotations

from collections import OrderedDict

import torch

from .preprocess import check_frames, check_mode, rgb
from .tokenizers import check_prompts


class RewardModel(torch.nn.Module):
    """A frozen preference model: ``score(frames, prompts) -> [B]``, higher is better.

    ``score`` is differentiable w.r.t. ``frames`` (float [B, 3, H, W] in [0, 1]; an RGBA
    batch [B, 4, H, W] has its alpha dropped).
    Prompt features are computed once per distinct prompt and cached (LRU, ``prompt_cache_size``
    entries, keyed by the prompt and ``_prompt_cache_key()``: every setting that changes them).
    ``preprocess`` is "reference" (the model's own published pipeline) or "squash"
    (the reference trainer's transform: stretch to 224x224; equal for square frames).
    """

    name: str = "reward"
    prompt_cache_size: int = 64
    needs_prompt: bool = True  # False: the score ignores the prompt (the aesthetic predictor)

    def __init__(self, preprocess: str = "reference"):
        super().__init__()
        self.preprocess = check_mode(preprocess)
        self._prompt_cache: OrderedDict = OrderedDict()

    def _prompt_cache_key(self) -> tuple:
        """Settings besides the prompt that change ``_prompt_features`` (subclasses extend it)."""
        return ()

    # Subclasses implement these two.
    def _prompt_features(self, prompts: list[str]):
        raise NotImplementedError

    def _score_pixels(self, frames: torch.Tensor, prompt_features, mode: str) -> torch.Tensor:
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def _apply(self, fn, *args, **kwargs):
        self._prompt_cache = OrderedDict()  # features live on the old device/dtype
        return super()._apply(fn, *args, **kwargs)

    def _cached_prompt_features(self, prompts: list[str]):
        """Per-prompt features (a tuple of tensors per prompt), stacked in ``prompts`` order."""
        settings = self._prompt_cache_key()
        missing = [p for p in dict.fromkeys(prompts) if (settings, p) not in self._prompt_cache]
        if missing:
            with torch.no_grad():
                features = self._prompt_features(missing)
            for index, prompt in enumerate(missing):
                self._prompt_cache[(settings, prompt)] = tuple(f[index] for f in features)
        per_prompt = [self._prompt_cache[(settings, p)] for p in prompts]
        for prompt in dict.fromkeys(prompts):
            self._prompt_cache.move_to_end((settings, prompt))
        while len(self._prompt_cache) > max(1, self.prompt_cache_size):
            self._prompt_cache.popitem(last=False)
        return tuple(torch.stack(parts) for parts in zip(*per_prompt))

    def score(self, frames: torch.Tensor, prompts, preprocess: str | None = None) -> torch.Tensor:
        """Scores [B] (float32) of each frame against its prompt (one prompt is broadcast)."""
        check_frames(frames)
        mode = check_mode(preprocess or self.preprocess)
        features = self._cached_prompt_features(check_prompts(prompts, frames.shape[0])) if self.needs_prompt else ()
        frames = rgb(frames).to(self.device, torch.float32)
        return self._score_pixels(frames, features, mode).float()

    def forward(self, frames: torch.Tensor, prompts, preprocess: str | None = None) -> torch.Tensor:
        return self.score(frames, prompts, preprocess)
