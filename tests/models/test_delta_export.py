"""Delta exports (``models/delta.py``): the export holds only the added parameters and the teacher's reference, and
``from_pretrained`` rebuilds the same model as the full export of the same conversion (real stories260K)."""

from __future__ import annotations

import json

import pytest
import torch

from linearize.convert.config import ConvertConfig
from linearize.convert.pipeline import ConvertJob, convert
from linearize.errors import ModelLoadError
from linearize.models.delta import DELTA_FILE


def _convert(stories_dir, out, export):
    settings = ConvertConfig.build(window=8, tokens=8 * 64, seq_len=64, val_tokens=4 * 64, batch_size=4,
                                   checkpoint_every=0, export=export)
    return convert(ConvertJob(model=str(stories_dir), out=out, settings=settings), log=lambda m: None)


def test_delta_export_round_trip_equals_the_full_export(stories_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    import linearize  # noqa: F401  (registers the linearized classes)

    full = _convert(stories_dir, tmp_path / "full", "full")
    delta = _convert(stories_dir, tmp_path / "delta", "delta")  # same seed and data: the same trained maps
    assert not list(delta.glob("model*.safetensors")) and (delta / DELTA_FILE).is_file()
    cfg = json.loads((delta / "config.json").read_text())
    assert cfg["linearize"]["delta_base"] == str(stories_dir.resolve())
    assert "delta_base" not in json.loads((full / "config.json").read_text())["linearize"]
    full_bytes = sum(p.stat().st_size for p in full.glob("*.safetensors"))
    assert (delta / DELTA_FILE).stat().st_size < full_bytes / 5

    ids = torch.randint(3, 500, (2, 40))
    models = {name: AutoModelForCausalLM.from_pretrained(path) for name, path in (("full", full), ("delta", delta))}
    with torch.no_grad():
        logits = {name: m(ids, use_cache=False).logits for name, m in models.items()}
    assert torch.equal(logits["delta"], logits["full"])
    for name, m in models.items():  # the LM head ties to the embeddings exactly where the full export's does
        tied = m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()
        assert tied == bool(models["full"].config.tie_word_embeddings), name
    gen = {name: m.generate(input_ids=ids[:1, :8], max_new_tokens=10, do_sample=False, pad_token_id=0)
           for name, m in models.items()}
    assert torch.equal(gen["delta"], gen["full"])
    bf16 = AutoModelForCausalLM.from_pretrained(delta, dtype=torch.bfloat16)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    remote = AutoModelForCausalLM.from_pretrained(delta, trust_remote_code=True)
    with torch.no_grad():
        assert torch.equal(remote(ids, use_cache=False).logits, logits["full"])


def test_delta_export_without_its_base_fails_in_one_line(stories_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    import linearize  # noqa: F401

    delta = _convert(stories_dir, tmp_path / "delta", "delta")
    cfg_path = delta / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["linearize"]["delta_base"] = str(tmp_path / "moved-away")
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="moved-away"):
        AutoModelForCausalLM.from_pretrained(delta)
