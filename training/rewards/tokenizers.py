"""Prompt tokenizers for HPS (open_clip's SimpleTokenizer), MPS and PickScore (an HF CLIP tokenizer).

Both use the CLIP BPE vocabulary that ships inside open_clip: nothing is downloaded.
HPS cleans text with ftfy + HTML unescaping and pads with 0; MPS (HF fast tokenizer)
does neither and pads with ``<|endoftext|>`` (49407). Each model keeps its own behaviour.
"""

from __future__ import annotations

import functools
import gzip
import json
import os
import tempfile

import torch

CONTEXT_LENGTH = 77


def check_prompts(prompts, batch: int) -> list[str]:
    """Prompts must be a list of ``batch`` non-empty strings (a single str is broadcast)."""
    if isinstance(prompts, str):
        prompts = [prompts] * batch
    if not isinstance(prompts, (list, tuple)):
        raise ValueError(f"prompts must be a list of strings, got {type(prompts).__name__}")
    prompts = list(prompts)
    if len(prompts) == 1 and batch > 1:
        prompts = prompts * batch
    if len(prompts) != batch:
        raise ValueError(f"got {len(prompts)} prompts for {batch} frames: give one prompt, or one per frame")
    for index, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise ValueError(f"prompt {index} must be a string, got {type(prompt).__name__}")
        if not prompt.strip():
            raise ValueError(f"prompt {index} is empty: a preference score needs the text the frames should show")
    return prompts


@functools.lru_cache(maxsize=4)
def _open_clip_tokenizer(context_length: int):
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(context_length=context_length)


def hps_tokenize(prompts: list[str], context_length: int = CONTEXT_LENGTH) -> torch.Tensor:
    """open_clip ``tokenize`` (what hpsv2 uses): [N, context_length] int64, pad 0."""
    return _open_clip_tokenizer(context_length)(prompts).long()


def _bpe_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    with gzip.open(default_bpe(), "rt", encoding="utf-8") as handle:
        lines = handle.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]
    tokens = list(bytes_to_unicode().values())
    tokens = tokens + [t + "</w>" for t in tokens] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: index for index, token in enumerate(tokens)}, merges


@functools.lru_cache(maxsize=1)
def mps_tokenizer():
    """HF CLIP tokenizer equal to ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``'s, built offline.

    The vocabulary and merges are written as the files an HF tokenizer folder holds and read
    back with ``from_pretrained`` (local files only): the same call works on transformers 4.x
    and 5.x, whose constructors differ.
    """
    from transformers import CLIPTokenizerFast

    vocab, merges = _bpe_vocab_and_merges()
    with tempfile.TemporaryDirectory(prefix="wan_reward_mps_tokenizer_") as folder:
        with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as handle:
            json.dump(vocab, handle, ensure_ascii=False)
        with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as handle:
            handle.write("#version: 0.2\n" + "\n".join(" ".join(pair) for pair in merges) + "\n")
        return CLIPTokenizerFast.from_pretrained(folder, model_max_length=CONTEXT_LENGTH, local_files_only=True)


def laion_tokenize(prompts: list[str], context_length: int = CONTEXT_LENGTH) -> torch.Tensor:
    """The laion ViT-H-14 HF tokenizer as the MPS reference calls it: pad to max length with 49407,
    truncate to 77. PickScore's reference pads to the longest prompt instead; the EOS features are
    the same (causal attention: the padding after the EOS token is never attended to)."""
    return mps_tokenizer()(list(prompts), max_length=context_length, padding="max_length",
                           truncation=True, return_tensors="pt").input_ids.long()


mps_tokenize = laion_tokenize
