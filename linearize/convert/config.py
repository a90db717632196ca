"""The settings of ``linearize convert`` (stage 1), defined once: the recipe's ``convert`` section and the CLI's
``convert`` flags are these fields.

``ConvertConfig`` = the attention settings saved with the export (:class:`LinearAttentionConfig`) + attention
transfer's optimisation (:class:`TransferConfig`, on the shared :class:`~linearize.settings.LoopConfig`) + where
the calibration text comes from and how much of it. ``cfg.attention()`` / ``TransferConfig.pick(cfg)`` take the
parts back out.
"""

from __future__ import annotations

from typing import Literal

from linearize.modules.config import LinearAttentionConfig
from linearize.settings import LoopConfig, check, positive


class TransferConfig(LoopConfig):
    """Optimisation settings of attention transfer (LoLCATs stage 1)."""

    loss: Literal["mse", "xent", "both"] = "mse"
    """mse (attention outputs, LoLCATs) | xent (attention weights, Hedgehog) | both."""
    mse_scale: float = 1000.0
    """Multiplier on the MSE term (LoLCATs uses 1000)."""
    xent_block: int = 128
    """Query rows per block of the cross-entropy loss (memory O(block * T))."""
    lr: float = 1e-2
    """Peak AdamW learning rate of the feature maps (LoLCATs: 1e-2, no weight decay)."""
    batch_size: int = 8
    """Sequences per step."""
    checkpoint_every: int = 50
    """Steps between resumable checkpoints (0 = only when interrupted with Ctrl-C)."""

    _sizes = positive("mse_scale", "xent_block", "batch_size")


class ConvertConfig(TransferConfig, LinearAttentionConfig):
    """Attention transfer (stage 1): the linear attention that replaces softmax, how it is trained, on what."""

    data: str | None = None
    """Calibration text: file or folder (.txt/.jsonl/.json/.parquet, .xz/.gz ok) or dataset name; null = text
    sampled from the teacher itself."""
    tokens: int = 200_000
    """Transfer training tokens (0 = export the untrained map)."""
    seq_len: int = 256
    """Tokens per transfer sequence."""
    val_tokens: int | None = None
    """Held-out tokens for the transfer report (default 5% of tokens, at least 4 sequences)."""

    _tokens = check("tokens", ok=lambda v: v >= 0, says="must be >= 0 (0 = export the untrained map)")
    _lengths = positive("seq_len", "val_tokens")

    def attention(self) -> LinearAttentionConfig:
        """The attention settings alone (what the export's config.json stores)."""
        return LinearAttentionConfig.pick(self)

    def transfer(self) -> TransferConfig:
        return TransferConfig.pick(self)


__all__ = ["ConvertConfig", "TransferConfig"]
