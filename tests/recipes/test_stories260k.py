"""The stories260k recipe through the real command, shortened with --set overrides: the real pretrained model is
converted, LoRA-finetuned, its validation loss drops, and the merged export loads and generates."""

from __future__ import annotations

import json

import pytest
import torch

from linearize.cli.recipe_commands import finetune_command
from tests.conftest import REPO, SHARED

RECIPE = REPO / "recipes" / "stories260k" / "finetune.yaml"


def test_stories260k_recipe_shortened(tmp_path, stories_dir, monkeypatch):
    if not (SHARED / "train-text" / "gutenberg-books").is_dir():
        pytest.skip(f"real training text not found at {SHARED / 'train-text'} (set LINEARIZE_SHARED)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.chdir(REPO)  # the recipe's relative paths start at the repository root
    out = finetune_command(RECIPE, [
        f"output={tmp_path / 'run'}", "convert.tokens=8192", "convert.seq_len=128",
        "finetune.tokens=32768", "finetune.seq_len=128", "finetune.val_tokens=4096",
    ], no_merge=False, dry_run=False)
    report = json.loads((out / "finetune_report.json").read_text())
    before, after = report["before"]["valid"]["loss"], report["after"]["valid"]["loss"]
    assert after < before - 0.05, (before, after)
    assert (out / "transfer_report.json").is_file() and report["steps"] == 32

    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    assert type(model).__name__ == "LinearizedLlamaForCausalLM"
    enc = tok("Once upon a time", return_tensors="pt")
    gen = model.generate(**enc, max_new_tokens=20, do_sample=False, pad_token_id=tok.pad_token_id)
    assert gen.shape[1] == enc["input_ids"].shape[1] + 20
    assert tok.decode(gen[0, enc["input_ids"].shape[1]:]).strip()
    with torch.no_grad():  # the cached decode matches a full forward on the generated text
        logits = model(gen, use_cache=False).logits
    assert torch.equal(logits[0, enc["input_ids"].shape[1] - 1 : -1].argmax(-1), gen[0, enc["input_ids"].shape[1]:])
