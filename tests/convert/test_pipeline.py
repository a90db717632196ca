"""The conversion pipeline end to end on a tiny saved model: report, resume after a kill, atomic export."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from linearize.convert.config import ConvertConfig
from linearize.convert.pipeline import ConvertJob, convert
from linearize.errors import LinearizeError
from tests.conftest import tiny_model

TEXT = " ".join(f"word{i % 37} token{i % 11} the cat sat on mat number {i}." for i in range(3000))


@pytest.fixture
def tiny_dir(tmp_path):
    """A tiny random Llama saved with a word-level tokenizer over the test text, plus that text as data."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model = tiny_model("llama")
    words = sorted(set(TEXT.replace(".", " .").split()))[:90]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                  pad_token="</s>")
    d = tmp_path / "teacher"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    (tmp_path / "data.txt").write_text(TEXT)
    return d


def _opts(tiny_dir, out, model=None, **kw):
    settings = dict(window=8, batch_size=2, checkpoint_every=3, data=str(tiny_dir.parent / "data.txt"),
                    tokens=12 * 32, seq_len=32, val_tokens=64)
    settings.update(kw)
    return ConvertJob(model=model or str(tiny_dir), out=out, settings=ConvertConfig(**settings))


def test_convert_reports_and_exports(tiny_dir, tmp_path):
    out = convert(_opts(tiny_dir, tmp_path / "out"), log=lambda m: None)
    report = json.loads((out / "transfer_report.json").read_text())
    assert report["steps"] == 6
    assert report["trained"]["kl"] < report["untrained"]["kl"]
    assert set(report["layer_loss_after"]) == {"0", "1"}  # JSON keys: the layer indices as strings
    # nothing beside the export: no work folder, no lock file, no partial or backup folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.txt", "out", "teacher"]
    with pytest.raises(LinearizeError, match="--overwrite"):
        convert(_opts(tiny_dir, out), log=lambda m: None)


def test_kill_and_resume_matches_uninterrupted(tiny_dir, tmp_path):
    ref = convert(_opts(tiny_dir, tmp_path / "ref"), log=lambda m: None)
    with pytest.raises(KeyboardInterrupt):
        convert(_opts(tiny_dir, tmp_path / "res"), log=lambda m: None, stop_after=4)
    assert not (tmp_path / "res").exists()  # nothing that looks like a finished export
    assert (tmp_path / ".res.work" / "transfer-ckpt").is_dir()
    logs = []
    got = convert(_opts(tiny_dir, tmp_path / "res"), log=logs.append)
    assert any("resuming" in m for m in logs)
    assert json.loads((got / "transfer_report.json").read_text())["resumed_from_step"] == 4
    a, b = load_file(str(ref / "model.safetensors")), load_file(str(got / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_changed_settings_do_not_resume_silently(tiny_dir, tmp_path):
    with pytest.raises(KeyboardInterrupt):
        convert(_opts(tiny_dir, tmp_path / "o"), log=lambda m: None, stop_after=2)
    with pytest.raises(LinearizeError, match="different settings"):
        convert(_opts(tiny_dir, tmp_path / "o", tokens=20 * 32), log=lambda m: None)
