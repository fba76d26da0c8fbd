"""Trainer options beyond the default path: high-noise expert, random window, several latents
and frames, batch > 1 with accumulation, samples, the umt5 text encoder, the gaming guard,
checkpoint averaging and the preflight refusal."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.helpers.trainer_runs import train_events as _train
from training.demo import PROMPTS, VALIDATION_PROMPTS, write_tiny_run
from training.lora_format import read_lora, save_canonical_lora
from training.lora_match import match_lora
from training.trainer.config import load_config
from training.trainer.outputs import average_loras
from training.trainer.validation import GamingGuard
from training.trainer.models import strip_prefix
from training.trainer.progress import EXIT_PREFLIGHT

PACK = Path(__file__).resolve().parents[1]


def test_high_expert_random_window_batch_accumulation_samples(tmp_path):
    path = write_tiny_run(tmp_path, expert="high", max_steps=2, backprop_strategy="random", backprop_random_last=2,
                          frames=9, decoded_latents=2, reward_frames=3, batch_size=2, gradient_accumulation_steps=2,
                          sample_every=2, validation_every=0, checkpoint_every=0, resume=False)
    events = _train(path)
    cfg = load_config(path)
    samples = [e for e in events if e["event"] == "sample"]
    assert len(samples) == 1 and len(samples[0]["paths"]) == 2 * 3  # batch x reward frames
    assert all(Path(p).is_file() for p in samples[0]["paths"])
    lora = read_lora(cfg.lora_path)
    assert lora.metadata["expert"] == "high"
    report = match_lora(lora, strip_prefix(load_file(cfg.high_noise_model)), expert="high")
    assert len(report.matched) == 22 and not report.unmatched
    assert any(float(t.abs().max()) > 0 for k, t in lora.tensors.items() if "lora_up" in k)


def test_umt5_text_encoder_path(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    from training.safe_io import save_safetensors

    words = sorted({w for p in PROMPTS + VALIDATION_PROMPTS for w in p.split()})
    vocab = {w: i for i, w in enumerate(["<pad>", "</s>", "<unk>"] + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(tmp_path / "tokenizer")
    torch.manual_seed(0)
    encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(vocab), d_model=64, d_kv=16, d_ff=128, num_layers=2,
                                          num_heads=4, feed_forward_proj="gated-gelu"))
    save_safetensors({k: v for k, v in encoder.state_dict().items() if k != "encoder.embed_tokens.weight"},
                     tmp_path / "umt5_tiny.safetensors")
    path = write_tiny_run(tmp_path, prompt_embeddings=None, text_encoder=str(tmp_path / "umt5_tiny.safetensors"),
                          tokenizer=str(tmp_path / "tokenizer"), max_steps=1, validation_every=0,
                          checkpoint_every=0, resume=False)
    events = _train(path)
    assert events[-1]["event"] == "finished" and [e["step"] for e in events if e["event"] == "step"] == [1]


def test_gaming_guard_flags_training_reward_up_held_out_down():
    guard = GamingGuard(patience=2)
    assert guard.update(0.20, 0.50, 1.0) is None  # base
    assert guard.update(0.25, 0.52, 1.0) is None and not guard.tripped  # both rise: fine
    message = guard.update(0.30, 0.49, 1.0)
    assert "held-out reward" in message and not guard.tripped
    message = guard.update(0.35, 0.49, 0.5)  # held-out flat but motion halves
    assert "motion" in message and guard.tripped
    assert guard.update(0.34, 0.40, 0.4) is None and not guard.tripped  # training reward fell: reset


def test_average_of_checkpoint_loras_is_the_mean_of_the_deltas(tmp_path):
    from training.lora_match import merged_weights

    gen = torch.Generator().manual_seed(0)
    base = {"blocks.0.self_attn.q.weight": torch.randn(8, 8, generator=gen)}
    loras = [{"blocks.0.self_attn.q": (torch.randn(8, 2, generator=gen), torch.randn(2, 8, generator=gen), alpha)}
             for alpha in (2.0, 1.0, 4.0)]
    paths = [save_canonical_lora(tmp_path / f"{n}.safetensors", m, {}) for n, m in enumerate(loras)]
    averaged = average_loras(paths)
    up, down, alpha = averaged["blocks.0.self_attn.q"]
    assert up.shape == (8, 6) and down.shape == (6, 8) and alpha == 6.0  # one LoRA of rank 3 x 2
    deltas = [merged_weights(base, read_lora(p), 1.0)["blocks.0.self_attn.q.weight"] - base["blocks.0.self_attn.q.weight"]
              for p in paths]
    mean = sum(deltas) / len(deltas)
    path = save_canonical_lora(tmp_path / "avg.safetensors", averaged, {})
    merged = merged_weights(base, read_lora(path), 1.0)["blocks.0.self_attn.q.weight"] - base["blocks.0.self_attn.q.weight"]
    assert torch.allclose(merged, mean, atol=1e-6)
    # the mean of the factors, the old way, is not the mean of the deltas
    naive = sum(u for u, _, _ in [lora["blocks.0.self_attn.q"] for lora in loras]) / 3 @ (
        sum(d for _, d, _ in [lora["blocks.0.self_attn.q"] for lora in loras]) / 3)
    assert not torch.allclose(naive, mean, atol=1e-3)


def test_preflight_refuses_a14b_experts_without_gpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    config = yaml.safe_load(write_tiny_run(tmp_path).read_text())
    from training.demo import TEXT_DIM
    from training.tiny_models import wan_expert_shapes, write_sparse_safetensors

    for name in ("high_noise_model", "low_noise_model"):
        big = tmp_path / f"{name}_a14b.safetensors"  # sparse: an A14B expert's header and size, no disk used
        write_sparse_safetensors(big, wan_expert_shapes(dim=5120, ffn_dim=13824, num_layers=40, text_dim=TEXT_DIM))
        config[name] = str(big)
    config.update(preflight=True, mixed_precision="bf16")
    path = tmp_path / "a14b.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = subprocess.run([sys.executable, str(PACK / "training" / "train_reward_lora.py"), "--config", str(path),
                           "--check-only"], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == EXIT_PREFLIGHT
    event = json.loads(proc.stdout.strip().splitlines()[-1])
    assert event["kind"] == "preflight" and "no GPU is visible" in event["message"]


def test_preflight_refuses_when_host_memory_cannot_hold_the_experts(tmp_path, monkeypatch):
    from training.trainer.preflight import PreflightError, check_environment

    if torch.cuda.is_available():
        pytest.skip("with a GPU the GPU-memory check refuses first")
    from training.demo import TEXT_DIM
    from training.tiny_models import wan_expert_shapes, write_sparse_safetensors

    config = yaml.safe_load(write_tiny_run(tmp_path).read_text())
    for name in ("high_noise_model", "low_noise_model"):  # A14B experts, sparse: 2 x 57 GB in float32
        big = tmp_path / f"{name}_huge.safetensors"
        write_sparse_safetensors(big, wan_expert_shapes(dim=5120, ffn_dim=13824, num_layers=40, text_dim=TEXT_DIM))
        config[name] = str(big)
    config.update(mixed_precision="no")
    path = tmp_path / "huge.yaml"
    path.write_text(yaml.safe_dump(config))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    with pytest.raises(PreflightError, match="host memory"):
        check_environment(load_config(path))


def test_umt5_comfyui_file_with_embedded_sentencepiece(tmp_path):
    """ComfyUI's umt5 files carry the tokenizer as a uint8 ``spiece_model`` tensor."""
    import sentencepiece
    from transformers import UMT5Config, UMT5EncoderModel

    from training.safe_io import save_safetensors
    from training.trainer.config import config_from_dict
    from training.trainer.models import encode_prompts_umt5

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(PROMPTS * 20 + VALIDATION_PROMPTS * 20))
    sentencepiece.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=40,
                                             pad_id=0, eos_id=1, unk_id=2, bos_id=-1)
    proto = (tmp_path / "sp.model").read_bytes()
    torch.manual_seed(0)
    encoder = UMT5EncoderModel(UMT5Config(vocab_size=64, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                                          feed_forward_proj="gated-gelu")).eval()
    tensors = {k: v.half() for k, v in encoder.state_dict().items() if k != "encoder.embed_tokens.weight"}
    tensors["spiece_model"] = torch.frombuffer(bytearray(proto), dtype=torch.uint8)
    save_safetensors(tensors, tmp_path / "umt5_tiny_fp16.safetensors")

    config = yaml.safe_load(write_tiny_run(tmp_path).read_text())
    config.update(prompt_embeddings=None, text_encoder=str(tmp_path / "umt5_tiny_fp16.safetensors"))
    assert config_from_dict(config).tokenizer is None  # no tokenizer folder needed

    out = encode_prompts_umt5(["a red fox", ""], str(tmp_path / "umt5_tiny_fp16.safetensors"), None,
                              torch.device("cpu"), torch.float32)
    ids = sentencepiece.SentencePieceProcessor(model_proto=proto).encode("a red fox") + [1]
    assert out["a red fox"].shape == (len(ids), 64) and out[""].shape == (1, 64)
    encoder.half().float()  # the file's precision
    with torch.no_grad():
        padded = torch.zeros(1, 512, dtype=torch.long)
        padded[0, : len(ids)] = torch.tensor(ids)
        mask = (torch.arange(512) < len(ids)).long()[None]
        ref = encoder(input_ids=padded, attention_mask=mask).last_hidden_state[0, : len(ids)]
    assert torch.allclose(out["a red fox"], ref, atol=1e-5)
