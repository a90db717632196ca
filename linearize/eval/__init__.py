"""Evaluation of linearized models against their softmax teachers: perplexity, zero-shot multiple choice and
long-context recall, on local files only.

- :mod:`~linearize.eval.perplexity`: sliding-window perplexity of a raw text file (transformers' protocol), and
  perplexity by position within long windows (what lies past a linearized model's window);
- :mod:`~linearize.eval.multiple_choice`: llm-foundry jsonl tasks (multiple choice, Winogrande schema, LAMBADA-style
  cloze) scored as lm-evaluation-harness scores them;
- :mod:`~linearize.eval.recall`: passkey retrieval and natural-text multi-query associative recall (MQAR), where a
  fixed-size state is expected to fall behind softmax attention;
- :mod:`~linearize.eval.run`: :func:`run_eval` for one :class:`EvalConfig`, model and teacher side by side with two
  baselines (the model with its linear part off; StreamingLLM, the teacher cut to the model's sinks + window), with
  a rich table and JSON; :mod:`~linearize.eval.plots` for PNGs.

    import linearize
    from linearize.eval import EvalConfig, render_table, run_eval
    from rich import print

    cfg = EvalConfig(model="out/smollm2-hedgehog", compare="HuggingFaceTB/SmolLM2-135M",
                     text="shared/data/wikitext-raw/wiki.valid.raw",
                     mc_files=["shared/data/llm-foundry-icl/piqa.jsonl", "shared/data/llm-foundry-icl/arc_easy.jsonl"],
                     passkey_contexts=[1024, 4096, 8192], json_out="eval.json", plot="plots/")
    print(render_table(run_eval(cfg)))

Single evaluations take a loaded ``(model, tokenizer)``, e.g. from :func:`linearize.io.loading.load_model`:

    from linearize.eval import evaluate_task, file_perplexity, passkey
    file_perplexity(model, tok, "wiki.valid.raw", context=1024, stride=512)["ppl"]
    evaluate_task(model, tok, "arc_easy.jsonl", limit=500)["acc_norm"]
    passkey(model, tok, contexts=[2048], depths=[0.5])["acc"]

Submodules load on first use, so ``import linearize.eval`` stays light (the config, for CLI generation, needs only
pydantic).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from linearize.eval.config import EvalConfig
    from linearize.eval.multiple_choice import evaluate_task, load_task
    from linearize.eval.perplexity import distance_perplexity, file_perplexity, text_perplexity
    from linearize.eval.plots import (plot_distance, plot_mqar, plot_passkey, plot_quality_vs_state, plot_throughput,
                                      write_plots)
    from linearize.eval.recall import mqar, passkey
    from linearize.eval.run import evaluate_model, render_table, run_eval, summarize, write_json
    from linearize.eval.scoring import SpanScore, score_spans

_LAZY = {
    "EvalConfig": "config",
    "evaluate_task": "multiple_choice", "load_task": "multiple_choice",
    "distance_perplexity": "perplexity", "file_perplexity": "perplexity", "text_perplexity": "perplexity",
    "plot_distance": "plots", "plot_mqar": "plots", "plot_passkey": "plots", "plot_quality_vs_state": "plots", "plot_throughput": "plots",
    "write_plots": "plots",
    "mqar": "recall", "passkey": "recall",
    "evaluate_model": "run", "render_table": "run", "run_eval": "run", "summarize": "run", "write_json": "run",
    "SpanScore": "scoring", "score_spans": "scoring",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"linearize.eval.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'linearize.eval' has no attribute {name!r}")


__all__ = sorted(_LAZY)
