"""``gpt``: a byte-level GPT (nanoGPT's architecture) in named sizes from ~1M to ~1B parameters.

The blocks are char-lm's (pre-norm causal self-attention + 4× GELU MLP, output layer tied to the token
embedding); what this module adds is the size table, so a job asks for ``{"size": "100m"}`` and its
checkpoints record that name. Explicit fields override a size's (``{"size": "1b", "block_size": 128}``).
The presets are part of the checkpoint format: a checkpoint records ``size`` and the overrides, not the
expanded numbers, so a preset's numbers never change once published; add a new name instead.

Parameters ≈ n_layer · 12 · n_embd² (attention 4d², MLP 8d²) + (vocab + block_size) · n_embd.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from torch import nn

from pipeline.models.char_lm import VOCAB_SIZE, CharLM, CharLMConfig


@dataclass(frozen=True)
class GPTConfig:
    """Model arguments of one size (the defaults are the ``1m`` size)."""

    vocab_size: int = VOCAB_SIZE  # bytes: the ``chars`` data set needs no tokenizer
    block_size: int = 256  # longest context (positions); inputs may be shorter
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0

    def n_params(self) -> int:
        """Exact parameter count, without building the model."""
        d = self.n_embd
        block = 12 * d * d + 13 * d  # qkv 3d²+3d, proj d²+d, fc 4d²+4d, proj 4d²+d, two LayerNorms 4d
        return self.n_layer * block + (self.vocab_size + self.block_size) * d + 2 * d


# Named sizes. Head size 32–128 as in GPT-2/3; the 1b row is GPT-3 XL's width at 20 layers.
SIZES: dict[str, GPTConfig] = {
    "1m": GPTConfig(n_layer=4, n_head=4, n_embd=128),  # 0.87M
    "10m": GPTConfig(n_layer=6, n_head=6, n_embd=384),  # 10.8M
    "100m": GPTConfig(n_layer=14, n_head=12, n_embd=768),  # 99.6M
    "1b": GPTConfig(n_layer=20, n_head=16, n_embd=2048),  # 1,008M (4.0 GB in fp32)
}
DEFAULT_SIZE = "1m"


def config_for(size: str | None = DEFAULT_SIZE, **overrides: Any) -> GPTConfig:
    """A size's config with explicit fields replaced; size None starts from GPTConfig's defaults."""
    if size is None:
        base = GPTConfig()
    elif size in SIZES:
        base = SIZES[size]
    else:
        raise ValueError(f"gpt: unknown size {size!r} (known: {', '.join(SIZES)}; or explicit n_layer/n_head/n_embd)")
    known = {f.name for f in fields(GPTConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TypeError(f"gpt: unknown model argument(s) {unknown} (known: size, {', '.join(sorted(known))})")
    cfg = replace(base, **overrides)
    if cfg.n_embd % cfg.n_head:
        raise ValueError(f"gpt: n_embd {cfg.n_embd} is not a multiple of n_head {cfg.n_head}")
    return cfg


class GPT(CharLM):
    """Decoder-only transformer: token ids (B, T) → next-token logits (B, T, vocab_size).

    The same architecture as ``char-lm`` (its blocks, init and tied output layer), sized by GPTConfig.
    Built under torch.device("meta") (Checkpoint.build), its init is free."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__(CharLMConfig(vocab_size=cfg.vocab_size, block_size=cfg.block_size, n_layer=cfg.n_layer,
                                      n_head=cfg.n_head, n_embd=cfg.n_embd, dropout=cfg.dropout))
        self.cfg = cfg  # type: ignore[assignment]  # GPTConfig: the same block_size the forward pass reads


def gpt(size: str | None = DEFAULT_SIZE, **overrides: Any) -> nn.Module:
    """Factory for the model table: a size name and/or GPTConfig fields."""
    return GPT(config_for(size, **overrides))


gpt.task = "lm"  # type: ignore[attr-defined]  # read by models.model_task for an import path


def default_args() -> dict[str, Any]:
    """What the model table records by default: the size's name (the expanded config is ``config_for``)."""
    return {"size": DEFAULT_SIZE}


def expanded_args(args: dict[str, Any]) -> dict[str, Any]:
    """Every field of the config `args` describe (for reports)."""
    return asdict(config_for(**args))
