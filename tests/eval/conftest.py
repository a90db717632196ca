"""Fixtures of the eval tests: the real stories260K teacher, a linearized export of it, and the shipped eval data,
loaded once per session (each skips with the reason when ../shared is absent)."""

from __future__ import annotations

import pytest

from tests.conftest import SHARED, STORIES, linear_config

WIKI = SHARED / "wikitext-raw" / "wiki.valid.raw"
ICL = SHARED / "llm-foundry-icl"


def need(path, what: str):
    if not path.exists():
        pytest.skip(f"{what} not found at {path} (set LINEARIZE_SHARED to the shared/ folder)")
    return path


@pytest.fixture(scope="session")
def stories():
    """(model, tokenizer) of the real stories260K teacher, fp32, SDPA."""
    need(STORIES / "config.json", "real stories260K model")
    from linearize.io.loading import load_model

    return load_model(STORIES, attn_implementation="sdpa")


@pytest.fixture(scope="session")
def stories_export(tmp_path_factory):
    """A linearized export of stories260K (hedgehog, window 16; feature maps at their initialisation)."""
    need(STORIES / "config.json", "real stories260K model")
    import torch

    import linearize  # noqa: F401  (registers the linearized classes)
    from linearize.convert.surgery import linearize_model
    from linearize.export.writer import save_linearized
    from linearize.io.loading import load_model

    torch.manual_seed(0)
    model, tok = load_model(STORIES)
    linearize_model(model, linear_config(window=16), teacher=str(STORIES))
    return save_linearized(model, tmp_path_factory.mktemp("export") / "stories-linear", tokenizer=tok)


@pytest.fixture(scope="session")
def wiki_text() -> str:
    return need(WIKI, "WikiText validation text").read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def icl():
    """The folder of the shipped llm-foundry jsonl tasks."""
    return need(ICL / "arc_easy.jsonl", "llm-foundry eval data").parent


@pytest.fixture(scope="session")
def eval_run(stories_export, wiki_text, icl, tmp_path_factory):
    """``(config, result)`` of one real run_eval: the export against its teacher, every task and both baselines,
    small settings."""
    from linearize.eval import EvalConfig, run_eval

    out = tmp_path_factory.mktemp("eval_run")
    text = out / WIKI.name  # the head of the file (about 12k tokens): each pass tokenizes the text it is given whole
    text.write_text(wiki_text[:40000], encoding="utf-8")
    cfg = EvalConfig(model=str(stories_export), compare=str(STORIES), text=str(text), max_tokens=3000, context=256,
                     stride=128, distance_tokens=2048, mc_files=[str(icl / "arc_easy.jsonl"), str(icl / "winogrande.jsonl")], limit=8,
                     passkey_contexts=[256, 512, 1024], passkey_depths=[0.0, 1.0], passkey_samples=2,
                     mqar_pairs=[2, 4, 16], mqar_samples=2, json_out=str(out / "eval.json"), plot=str(out / "plots"))
    return cfg, run_eval(cfg)
