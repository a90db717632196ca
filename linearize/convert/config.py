"""The settings of ``linearize convert`` (stage 1), defined once: the recipe's ``convert`` section and the CLI's
``convert`` flags are these fields.

``ConvertConfig`` = the attention settings saved with the export (:class:`LinearAttentionConfig`) + attention
transfer's optimisation (:class:`TransferConfig`, on the shared :class:`~linearize.settings.LoopConfig`) + where
the calibration text comes from and how much of it + which extra layers stay softmax (``auto_softmax_layers`` /
``state_budget``, chosen by ``convert/selection.py``). ``cfg.attention()`` / ``TransferConfig.pick(cfg)`` take the
parts back out.
"""

from __future__ import annotations

from typing import Literal

from pydantic import field_validator, model_validator

from linearize.modules.config import LinearAttentionConfig
from linearize.settings import LoopConfig, check, one_or_many, parse_bytes, positive


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
    layers_per_block: int | None = None
    """Block-wise transfer: train consecutive blocks of N student layers one after the other, each for all the
    steps, with a teacher forward that stops after the block's last layer, so memory holds one block's recorded
    inputs and optimizer state; null = all layers jointly (docs/convert.md). Equals joint transfer exactly with
    grad_clip 0; with clipping the results differ (joint clips the norm over all layers' gradients, a block over
    its own)."""

    _sizes = positive("mse_scale", "xent_block", "batch_size")
    _blocks = check("layers_per_block", ok=lambda v: v > 0,
                    says="must be a positive number of layers (null = all layers jointly)")


DEFAULT_SEQ_LEN = 1024
"""Transfer sequence length when ``seq_len`` is null (capped at the model's context)."""


class ConvertConfig(TransferConfig, LinearAttentionConfig):
    """Attention transfer (stage 1): the linear attention that replaces softmax, how it is trained, on what."""

    data: str | list[str] | None = None
    """Calibration text: file or folder (.txt/.jsonl/.json/.parquet, .xz/.gz ok) or dataset name, or a list of them
    mixed evenly by characters; null = text sampled from the teacher itself."""
    tokens: int = 200_000
    """Transfer training tokens (0 = export the untrained map)."""
    seq_len: int | None = None
    """Tokens per transfer sequence; null = min(1024, the model's context). Long sequences train the linear part
    on keys far beyond the window (measured: docs/benchmarks.md, #12's ablation)."""
    val_tokens: int | None = None
    """Held-out tokens for the transfer report (default 5% of tokens, at least 4 sequences)."""

    layers: Literal["all", "global"] | None = None
    """Which layers become linear: all | global = only the layers the teacher runs over the whole context, while
    its sliding-window (local) layers keep their own attention, unchanged, with a cache of their window's keys
    (Gemma 3, Qwen2/3 with use_sliding_window: config.layer_types); null = global where the teacher has both kinds,
    all otherwise. The export lists the kept local layers in softmax_layers; `linearize info` shows them as local
    (docs/convert.md)."""
    export: Literal["full", "delta"] = "full"
    """full: every weight in the export | delta: only the added feature maps and mix factors, plus the teacher's
    reference, from which from_pretrained rebuilds the model (MBs instead of GBs; the teacher must stay available)."""
    auto_softmax_layers: int | None = None
    """Keep this many more layers as exact softmax (with a KV cache), on top of softmax_layers: the ones whose linear
    version costs the most KL to the teacher, measured after attention transfer (docs/convert.md)."""
    state_budget: int | str | None = None
    """Generation cache per sequence at budget_context tokens, in bytes ("24MiB", "1.5GB", "2000000") or as a share
    of the teacher's KV cache at that length ("25%", the same for any model size): as many of the most sensitive
    layers as fit stay exact softmax (softmax_layers count against it); excludes auto_softmax_layers."""
    budget_context: int = 4096
    """Context length (tokens) at which state_budget is counted: softmax layers' KV cache grows with it."""
    auto_window_only: bool | None = None
    """After attention transfer (and the softmax layers' selection), switch the linear part off in the layers where
    that lowers the held-out score of selection_score (greedy: each layer alone first, then adding the best ones while
    the score still falls); the chosen layers join window_only_layers and keep no state in the generation cache
    (docs/convert.md). null = on wherever there is a window and the transfer trains (tokens > 0): on SmolLM2-135M's
    data-free default conversion 1.37x -> 1.25x the teacher's WikiText perplexity, 13 of 30 layers chosen in 18 s."""
    selection_score: Literal["kl", "recall", "both"] = "kl"
    """What the layer scores of auto_softmax_layers / state_budget / auto_window_only reward: kl = next-token KL to
    the teacher on held-out text; recall = KL on the second copy of a span repeated 7/8 of a sequence later (copying
    from far back, which only attention that reaches beyond the window does); both = the two, each relative to its
    value with every layer linear, summed (docs/convert.md)."""

    recall_context: int | None = None
    """Tokens per recall probe of selection_score recall | both: each probe repeats a span of seq_len / 8 tokens
    (less its length) this many tokens later; null = the calibration sequence length (a span copied 7/8 of a
    sequence later). Longer probes join consecutive held-out blocks, so that the scores see recall at the distances
    generation reaches (e.g. 4096)."""

    _data = one_or_many("data")
    _tokens = check("tokens", ok=lambda v: v >= 0, says="must be >= 0 (0 = export the untrained map)")
    _lengths = positive("seq_len", "val_tokens", "budget_context", "recall_context")
    _auto = check("auto_softmax_layers", ok=lambda v: v >= 0, says="must be >= 0")

    @field_validator("state_budget", mode="before")
    @classmethod
    def _budget_bytes(cls, v):
        if isinstance(v, str) and v.strip().endswith("%"):
            try:
                share = float(v.strip()[:-1])
            except ValueError:
                raise ValueError(f"{v!r} is not a share: use a percentage of the teacher's KV cache, "
                                 "e.g. '25%'") from None
            if not 0 < share < 100:
                raise ValueError(f"{v!r}: a share of the teacher's KV cache must be above 0 % and below 100 %")
            return f"{share:g}%"
        return None if v is None else parse_bytes(v)

    @model_validator(mode="after")
    def _one_selection(self) -> ConvertConfig:
        if self.auto_softmax_layers is not None and self.state_budget is not None:
            raise ValueError(f"auto_softmax_layers={self.auto_softmax_layers} and state_budget={self.state_budget} "
                             "exclude each other: give the number of extra softmax layers or the cache budget that "
                             "sets it, not both")
        if self.selection_score != "kl" and self.auto_softmax_layers is None and self.state_budget is None \
                and not self.window_only_on:
            raise ValueError(f"selection_score={self.selection_score!r} scores the layers that auto_softmax_layers or "
                             "state_budget keep softmax, or that auto_window_only switches to window-only: set one "
                             "of them too")
        if self.recall_context is not None and self.selection_score == "kl":
            raise ValueError(f"recall_context={self.recall_context} sets the recall probes' length: it needs "
                             "selection_score recall or both")
        if self.auto_window_only and not self.window:
            raise ValueError("auto_window_only needs window > 0 (without its linear part a layer reads its window "
                             "alone)")
        return self

    @property
    def held_out_tokens(self) -> int:
        """Calibration tokens held out for the report and the layer selections: ``val_tokens``, or 5 % of ``tokens``
        and at least 4 sequences."""
        return self.val_tokens or max(4 * self.seq_len, self.tokens // 20)

    @property
    def window_only_on(self) -> bool:
        """Whether the conversion chooses window-only layers: ``auto_window_only``, or where it is null (the
        default), whether there is a window and the transfer trains."""
        if self.auto_window_only is not None:
            return self.auto_window_only
        return bool(self.window) and self.tokens > 0

    def attention(self) -> LinearAttentionConfig:
        """The attention settings alone (what the export's config.json stores)."""
        return LinearAttentionConfig.pick(self)

    def transfer(self) -> TransferConfig:
        return TransferConfig.pick(self)


__all__ = ["DEFAULT_SEQ_LEN", "ConvertConfig", "TransferConfig"]
