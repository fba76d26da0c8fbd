"""The MPS condition cross model (4 layers in the released file), written from its description.

State-dict keys equal the official ``Cross_model``'s
(``layers.{i}.0.fn.*`` cross-attention, ``layers.{i}.1.fn.*`` parallel block), so
converted checkpoints load strictly. Attention uses ``scaled_dot_product_attention``
(the reference's max-subtraction does not change a softmax).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LayerNormNoBias(nn.Module):
    """LayerNorm whose bias is a zero buffer (stored in the state dict), eps 1e-5."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.register_buffer("bias", torch.zeros(dim))

    def forward(self, x):
        return F.layer_norm(x, x.shape[-1:], self.weight, self.bias)


class SwiGLU(nn.Module):
    """First half is the value, second half the gate."""

    def forward(self, x):
        value, gate = x.chunk(2, dim=-1)
        return F.silu(gate) * value


class Residual(nn.Module):
    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, x, *args):
        return self.fn(x, *args) + x


class RotaryEmbedding(nn.Module):
    def __init__(self, dim_head: int):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0, dim_head, 2).float() / dim_head)))

    def forward(self, length: int) -> torch.Tensor:
        # Angles in fp32 from the stored inv_freq (the reference computes them in the module
        # dtype, which in bf16 is off by up to ~1 rad; we keep the stored values exact).
        seq = torch.arange(length, device=self.inv_freq.device, dtype=torch.float32)
        freqs = torch.outer(seq, self.inv_freq.float())
        return torch.cat((freqs, freqs), dim=-1)


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _apply_rotary(pos, t):
    cos, sin = pos.cos().to(t.dtype), pos.sin().to(t.dtype)
    return t * cos + _rotate_half(t) * sin


def _heads(t, heads: int):
    """The single shared key/value head, viewed once per query head."""
    return t.unsqueeze(1).expand(-1, heads, -1, -1)


class CrossAttention(nn.Module):
    """Multi-query cross-attention from image tokens to text tokens, plus a parallel SwiGLU FF."""

    def __init__(self, dim: int, dim_head: int, heads: int, ff_mult: int):
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        self.norm = LayerNormNoBias(dim)
        self.to_q = nn.Linear(dim, heads * dim_head, bias=False)
        self.to_kv = nn.Linear(dim, dim_head * 2, bias=False)
        self.to_out = nn.Linear(heads * dim_head, dim, bias=False)
        self.ff = nn.Sequential(nn.Linear(dim, ff_mult * dim * 2, bias=False), SwiGLU(),
                                nn.Linear(ff_mult * dim, dim, bias=False))

    def forward(self, x, context, mask):
        b, n, _ = x.shape
        xn = self.norm(x)
        q = self.to_q(xn).view(b, n, self.heads, self.dim_head).transpose(1, 2)
        k, v = self.to_kv(context).chunk(2, dim=-1)
        # mask: [B, 1 or N, T] additive (0 / -inf), the same for every head.
        out = F.scaled_dot_product_attention(q, _heads(k, self.heads), _heads(v, self.heads),
                                             attn_mask=mask.unsqueeze(1).to(q.dtype))
        out = out.transpose(1, 2).reshape(b, n, self.heads * self.dim_head)
        return self.to_out(out) + self.ff(xn)


class ParallelBlock(nn.Module):
    """Self-attention (multi-query, rotary, unmasked) and SwiGLU FF from one fused projection."""

    def __init__(self, dim: int, dim_head: int, heads: int, ff_mult: int):
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        self.fused_dims = (heads * dim_head, dim_head, dim_head, ff_mult * dim * 2)
        self.norm = LayerNormNoBias(dim)
        self.rotary_emb = RotaryEmbedding(dim_head)
        self.fused_attn_ff_proj = nn.Linear(dim, sum(self.fused_dims), bias=False)
        self.attn_out = nn.Linear(heads * dim_head, dim, bias=False)
        self.ff_out = nn.Sequential(SwiGLU(), nn.Linear(ff_mult * dim, dim, bias=False))

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v, ff = self.fused_attn_ff_proj(self.norm(x)).split(self.fused_dims, dim=-1)
        q = q.view(b, n, self.heads, self.dim_head).transpose(1, 2)
        pos = self.rotary_emb(n)
        q, k = _apply_rotary(pos, q), _apply_rotary(pos, k)
        out = F.scaled_dot_product_attention(q, _heads(k, self.heads), _heads(v, self.heads))
        out = out.transpose(1, 2).reshape(b, n, self.heads * self.dim_head)
        return self.attn_out(out) + self.ff_out(ff)


class CrossModel(nn.Module):
    def __init__(self, dim: int = 1024, layers: int = 4, dim_head: int = 64, heads: int = 16, ff_mult: int = 4):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleList([Residual(CrossAttention(dim, dim_head, heads, ff_mult)),
                           Residual(ParallelBlock(dim, dim_head, heads, ff_mult))])
            for _ in range(layers)
        )

    def forward(self, image_tokens, text_tokens, mask):
        x = image_tokens
        for cross, block in self.layers:
            x = cross(x, text_tokens, mask)
            x = block(x)
        return x
