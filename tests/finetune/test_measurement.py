"""finetune's measuring passes (teacher and transfer-only model before training, the finetuned model after) show
progress, each pass a task counted in batches, and ``eval.seq_len`` past the model's context is clamped to it with
a log line, as ``linearize eval`` does."""

from __future__ import annotations

import pytest

from linearize.finetune.pipeline import run_recipe
from linearize.recipes import load_recipe
from tests.conftest import RecordingProgress


def test_measurement_shows_progress_and_clamps_eval_seq_len(tiny_run):
    tmp, write = tiny_run
    recipe = load_recipe(write(), [f"eval.text={tmp / 'data.txt'}", "eval.seq_len=1024", "eval.max_tokens=1024",
                                   "eval.batch_size=2"])
    progress = RecordingProgress()
    with pytest.raises(KeyboardInterrupt):  # stop after the first step: the measurement before training is done
        run_recipe(recipe, progress=progress, stop_after=1)
    assert ("eval.seq_len 1024 > the model's context of 256 tokens (max_position_embeddings): measuring data.txt in "
            "blocks of 256") in progress.logs
    passes = {t["name"]: t for t in progress.tasks if t["name"].startswith("measuring ")}
    assert set(passes) == {f"measuring the {who} on {what}" for who in ("teacher", "transfer-only model")
                           for what in ("held-out data", "data.txt")}
    for name, task in passes.items():
        assert task["unit"] == "batches" and task["done"] == list(range(1, task["total"] + 1)), (name, task)
    assert passes["measuring the teacher on data.txt"]["total"] == 2  # 1024 tokens: 4 blocks of 256, 2 a batch
