"""The conversion pipeline end to end on a tiny saved model: report, resume after a kill, atomic export."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from linearize.convert.pipeline import convert
from linearize.errors import LinearizeError
from tests.conftest import tiny_convert_job


def test_convert_reports_and_exports(tiny_dir, tmp_path):
    out = convert(tiny_convert_job(tiny_dir, tmp_path / "out"), log=lambda m: None)
    report = json.loads((out / "transfer_report.json").read_text())
    assert report["steps"] == 6
    assert report["trained"]["kl"] < report["untrained"]["kl"]
    assert set(report["layer_loss_after"]) == {"0", "1"}  # JSON keys: the layer indices as strings
    off = report["linear_off"]  # the same model on its exact part alone, on the same held-out blocks
    assert off["tokens"] == report["trained"]["tokens"] and off["ppl_teacher"] == report["trained"]["ppl_teacher"]
    assert off["kl"] > 0 and abs(off["kl"] - report["trained"]["kl"]) > 1e-6
    # nothing beside the export: no work folder, no lock file, no partial or backup folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.txt", "out", "teacher"]
    with pytest.raises(LinearizeError, match="--overwrite"):
        convert(tiny_convert_job(tiny_dir, out), log=lambda m: None)


def test_kill_and_resume_matches_uninterrupted(tiny_dir, tmp_path):
    ref = convert(tiny_convert_job(tiny_dir, tmp_path / "ref"), log=lambda m: None)
    with pytest.raises(KeyboardInterrupt):
        convert(tiny_convert_job(tiny_dir, tmp_path / "res"), log=lambda m: None, stop_after=4)
    assert not (tmp_path / "res").exists()  # nothing that looks like a finished export
    assert (tmp_path / ".res.work" / "transfer-ckpt").is_dir()
    logs = []
    got = convert(tiny_convert_job(tiny_dir, tmp_path / "res"), log=logs.append)
    assert any("resuming" in m for m in logs)
    assert json.loads((got / "transfer_report.json").read_text())["resumed_from_step"] == 4
    a, b = load_file(str(ref / "model.safetensors")), load_file(str(got / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_changed_settings_do_not_resume_silently(tiny_dir, tmp_path):
    with pytest.raises(KeyboardInterrupt):
        convert(tiny_convert_job(tiny_dir, tmp_path / "o"), log=lambda m: None, stop_after=2)
    with pytest.raises(LinearizeError, match="different settings"):
        convert(tiny_convert_job(tiny_dir, tmp_path / "o", tokens=20 * 32), log=lambda m: None)


@pytest.mark.parametrize("attn", [{"state_update": "gated-delta", "window_dropout": 0.3}, {"global_cache": 3}],
                         ids=["gated-delta+window-dropout", "global-cache"])
def test_the_new_state_settings_convert_export_and_generate(tiny_dir, tmp_path, attn):
    """convert -> export -> AutoModelForCausalLM -> generate with each #27 setting: the export records it, the
    reloaded model reproduces the converted one's logits, and prefill + decode give the parallel forward's."""
    from transformers import AutoModelForCausalLM

    from linearize.models.base import output_cache

    path = convert(tiny_convert_job(tiny_dir, tmp_path / "e", **attn), log=lambda m: None)
    lin = json.loads((path / "config.json").read_text())["linearize"]
    for key in ("state_update", "global_cache"):
        if key in attn:
            assert lin[key] == attn[key]
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = torch.randint(3, 90, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        out = model(ids[:, :17], use_cache=True)
        cache, steps = output_cache(out), [out.logits]
        for t in range(17, 40):
            out = model(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
            steps.append(out.logits)
        gen = model.generate(input_ids=ids[:, :10], max_new_tokens=5, do_sample=False, pad_token_id=0)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=2e-4, rtol=2e-4)
    assert gen.shape == (1, 15)
