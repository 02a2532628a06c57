"""A tiny DeepSeek-V3-style decoder: MLA attention in the absorbed (latent) form, a top-k MoE whose experts run as
grouped FP8 GEMMs (`FP8Experts`), and expert parallelism through `torch_deepstack.ep.Buffer`.

Attention keeps one latent KV head per token: 512 "nope" channels plus 64 RoPE channels (576 in all), and V is the
first 512 channels of K. Training runs the whole sequence through plain PyTorch attention; decoding appends each
token's latent row to a `PagedKVCache` and calls `mla_decode_with_kvcache`, the same function, so generated
logits match the full forward pass.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from torch_deepstack.gemm import FP8Experts

LATENT, ROPE = 512, 64
HEAD_DIM = LATENT + ROPE


@dataclass
class TinyDeepSeekConfig:
    vocab: int = 128
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 2
    n_experts: int = 4
    top_k: int = 2
    d_ff: int = 256
    max_seq: int = 256


def rope(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Rotary embedding on the last dim (64 channels); `pos` must broadcast against x.shape[:-1]."""
    half = x.shape[-1] // 2
    freq = 1.0 / (10000 ** (torch.arange(half, device=x.device, dtype=torch.float32) / half))
    ang = pos.float()[..., None] * freq
    cos, sin = ang.cos(), ang.sin()
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).to(x.dtype)


class MLAAttention(nn.Module):
    def __init__(self, cfg: TinyDeepSeekConfig):
        super().__init__()
        self.h = cfg.n_heads
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * HEAD_DIM, bias=False)
        self.kv_proj = nn.Linear(cfg.d_model, HEAD_DIM, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * LATENT, cfg.d_model, bias=False)
        self.scale = HEAD_DIM ** -0.5

    def qk(self, x: torch.Tensor, pos: torch.Tensor):
        """q [B, T, H, 576] and the latent cache row k [B, T, 576], both with RoPE on the last 64 channels."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.h, HEAD_DIM)
        k = self.kv_proj(x)
        q = torch.cat([q[..., :LATENT], rope(q[..., LATENT:], pos[:, None])], -1)
        k = torch.cat([k[..., :LATENT], rope(k[..., LATENT:], pos)], -1)
        return q, k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k = self.qk(x, torch.arange(t, device=x.device))
        scores = torch.einsum("bthd,bsd->bhts", q.float(), k.float()) * self.scale
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
        p = scores.masked_fill(causal, float("-inf")).softmax(-1)
        out = torch.einsum("bhts,bsd->bthd", p, k[..., :LATENT].float()).to(x.dtype)
        return self.o_proj(out.reshape(b, t, self.h * LATENT))

    def decode(self, x: torch.Tensor, cache, pos: int) -> torch.Tensor:
        """One new token per request (x [B, 1, D]) at position `pos`, attending over the paged cache."""
        b = x.shape[0]
        q, k = self.qk(x, torch.full((1,), pos, device=x.device))
        cache.append(list(range(b)), k.reshape(b, 1, HEAD_DIM).to(cache.dtype))
        out, _ = cache.decode(q.to(cache.dtype), softmax_scale=self.scale)
        return self.o_proj(out.to(x.dtype).reshape(b, 1, self.h * LATENT))


class MoE(nn.Module):
    """Top-k routed experts (silu MLPs as grouped FP8 GEMMs); tokens travel to their experts' rank and back through
    ep.Buffer. Every rank holds all experts' weights (a tiny model); a rank runs the ones dispatch hands it."""

    def __init__(self, cfg: TinyDeepSeekConfig, buffer=None):
        super().__init__()
        self.cfg = cfg
        self.router = nn.Linear(cfg.d_model, cfg.n_experts, bias=False)
        self.mlp = FP8Experts(cfg.n_experts, cfg.d_model, cfg.d_ff, gated=False)
        self.buffer = buffer

    def experts(self, x: torch.Tensor, local_idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Each row's experts (local ids, -1: none) weighted and summed: one forward of FP8Experts."""
        return self.mlp(x, local_idx, weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits = self.router(x).float()
        weights, idx = logits.softmax(-1).topk(self.cfg.top_k, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        if self.buffer is None:
            return self.experts(x, idx, weights).reshape(shape)
        per_rank, _, per_expert, in_rank, _ = self.buffer.get_dispatch_layout(idx, self.cfg.n_experts)
        recv_x, recv_idx, recv_w, _, handle, _ = self.buffer.dispatch(
            x, topk_idx=idx, topk_weights=weights, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
            num_tokens_per_expert=per_expert)
        y, _, _ = self.buffer.combine(self.experts(recv_x, recv_idx, recv_w), handle)
        return y.reshape(shape)


class Block(nn.Module):
    def __init__(self, cfg: TinyDeepSeekConfig, buffer=None):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.d_model)
        self.attn = MLAAttention(cfg)
        self.ffn_norm = nn.RMSNorm(cfg.d_model)
        self.moe = MoE(cfg, buffer)

    def forward(self, x):
        x = x + self.attn(self.attn_norm(x))
        return x + self.moe(self.ffn_norm(x))

    def decode(self, x, cache, pos):
        x = x + self.attn.decode(self.attn_norm(x), cache, pos)
        return x + self.moe(self.ffn_norm(x))


class TinyDeepSeek(nn.Module):
    def __init__(self, cfg: TinyDeepSeekConfig | None = None, buffer=None):
        super().__init__()
        self.cfg = cfg = cfg or TinyDeepSeekConfig()
        self.embed = nn.Embedding(cfg.vocab, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, buffer) for _ in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x))

    def new_caches(self, batch: int, device, dtype=torch.bfloat16, fp8: bool = False):
        from torch_deepstack.mla import PagedKVCache
        blocks = batch * ((self.cfg.max_seq + 63) // 64)
        return [PagedKVCache(blocks, batch, self.cfg.max_seq, dtype=dtype, device=device, fp8=fp8)
                for _ in self.blocks]

    @torch.no_grad()
    def prefill(self, tokens: torch.Tensor, caches) -> torch.Tensor:
        """Run the prompt tokens [B, T] through the full forward pass, writing every position's latent KV row into
        the caches (requests 0..B-1, empty before); returns the last position's logits [B, vocab]."""
        b, t = tokens.shape
        x = self.embed(tokens)
        for blk, cache in zip(self.blocks, caches):
            _, k = blk.attn.qk(blk.attn_norm(x), torch.arange(t, device=x.device))
            for r in range(b):
                cache.append(r, k[r].unsqueeze(1).to(cache.dtype))
            x = blk(x)
        return self.head(self.norm(x))[:, -1]

    @torch.no_grad()
    def decode_step(self, tokens: torch.Tensor, caches, pos: int) -> torch.Tensor:
        """Logits [B, vocab] for the next token after `tokens` [B] at position `pos`, updating the caches."""
        x = self.embed(tokens).unsqueeze(1)
        for blk, cache in zip(self.blocks, caches):
            x = blk.decode(x, cache, pos)
        return self.head(self.norm(x))[:, 0]
