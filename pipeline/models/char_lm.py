"""``char-lm``: a small decoder-only transformer over bytes (its corpus is ``pipeline/corpus.py``).

The model follows nanoGPT (Karpathy): token + position embeddings, pre-norm blocks of causal
self-attention and a 4× GELU MLP, a final LayerNorm, and an output layer tied to the token embedding.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

VOCAB_SIZE = 256  # byte-level: every byte value is a token


@dataclass(frozen=True)
class CharLMConfig:
    """Model arguments. Defaults: ~0.8M parameters; one fwd+bwd of 32×64 tokens ≈ 0.15 s on one CPU thread."""

    vocab_size: int = VOCAB_SIZE
    block_size: int = 64  # longest context (positions); inputs may be shorter
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: CharLMConfig) -> None:
        super().__init__()
        if cfg.n_embd % cfg.n_head:
            raise ValueError(f"char-lm: n_embd {cfg.n_embd} is not a multiple of n_head {cfg.n_head}")
        self.n_head = cfg.n_head
        self.dropout = cfg.dropout
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)  # q, k, v in one matmul
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, C) → (B, T, C)
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(c, dim=2)  # each (B, T, C)
        # (B, T, C) → (B, nh, T, hs)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                           is_causal=True)  # (B, nh, T, hs); position i sees 0..i only
        y = y.transpose(1, 2).contiguous().view(b, t, c)  # (B, T, C)
        return self.resid_drop(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: CharLMConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) → (B, T, C)
        return self.drop(self.c_proj(F.gelu(self.c_fc(x))))  # hidden (B, T, 4C)


class Block(nn.Module):
    def __init__(self, cfg: CharLMConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C), pre-norm residual
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class CharLM(nn.Module):
    """Decoder-only transformer: token ids (B, T) → next-token logits (B, T, vocab_size)."""

    def __init__(self, cfg: CharLMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        # The output layer reuses wte.weight through F.linear rather than a second module holding the
        # same tensor: the state dict then has one entry per tensor (safetensors refuses shared storage,
        # and the aggregator updates parameters by name).
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # GPT-2: scale residual projections by depth
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:  # idx: (B, T) int64 → logits (B, T, V)
        _, t = idx.shape
        if t > self.cfg.block_size:
            raise ValueError(f"char-lm: sequence length {t} exceeds block_size {self.cfg.block_size}")
        pos = torch.arange(t, device=idx.device)  # (T,)
        x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C)
        for block in self.blocks:
            x = block(x)
        return F.linear(self.ln_f(x), self.wte.weight)  # (B, T, C) @ (C, V) → (B, T, V)


def char_lm(**kwargs: Any) -> nn.Module:
    """Factory for the model registry: keyword arguments are CharLMConfig fields."""
    return CharLM(CharLMConfig(**kwargs))


char_lm.task = "lm"  # type: ignore[attr-defined]  # read by models.model_task for an import path


def default_args() -> dict[str, Any]:
    """The full argument dict of the default configuration (what a checkpoint should record)."""
    return asdict(CharLMConfig())
