"""Export -> load in a fresh interpreter (registered classes, and trust_remote_code without importing linearize)
-> identical logits; generate() on the loaded model; real tokenizers; the real stories260K model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from linearize.convert.surgery import linearize_model
from linearize.export.writer import save_linearized
from linearize.models.base import output_cache
from tests.conftest import linear_config, rel_err, tiny_model

LOAD_SCRIPT = r"""
import json, sys, torch
mode, path, ids = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
from transformers import AutoModelForCausalLM
if mode == "registered":
    import linearize  # registers the linearized_* model types
    model = AutoModelForCausalLM.from_pretrained(path)
else:
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
x = torch.tensor(ids)
with torch.no_grad():
    logits = model(x, use_cache=False).logits
gen = model.generate(x, max_new_tokens=5, do_sample=False, pad_token_id=0)
print(json.dumps({"cls": type(model).__name__, "logits": logits.flatten().tolist(), "gen": gen.tolist(),
                  "has_linear": any("linear_attn" in n for n, _ in model.named_parameters())}))
"""


def _load_in_subprocess(mode, path, ids):
    r = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, mode, str(path), json.dumps(ids.tolist())],
                       capture_output=True, text=True, cwd=str(path), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("family,attn", [("llama", dict(window=8)), ("qwen2", dict(window=0, feature_map="based")),
                                         ("gpt2", dict(window=8, feature_map="performer"))])
@pytest.mark.parametrize("mode", ["registered", "remote_code"])
def test_export_then_load_fresh_process(tmp_path, family, attn, mode):
    model = linearize_model(tiny_model(family), linear_config(**attn), teacher=f"tiny-{family}")
    out = save_linearized(model, tmp_path / "export")
    files = {p.name for p in out.iterdir()}
    assert "model.safetensors" in files and "config.json" in files and "modeling_linearize.py" in files
    assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)  # no pickle anywhere
    ids = torch.randint(1, 96, (1, 17))
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
    got = _load_in_subprocess(mode, out, ids)
    assert got["cls"] == type(model).__name__ and got["has_linear"]
    assert rel_err(torch.tensor(got["logits"]).view_as(ref), ref) == 0.0
    ref_gen = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert got["gen"] == ref_gen.tolist()


@pytest.mark.parametrize("family", ["qwen3", "phi3", "gemma3"])
def test_newer_families_export_and_load(tmp_path, family):
    """Each family added after the first four saves and loads back through the Auto classes with its own
    linearized class and the same logits (in this process: the fresh-process path is the same for every family)."""
    from transformers import AutoModelForCausalLM

    model = linearize_model(tiny_model(family), linear_config(window=8, sinks=2), teacher=f"tiny-{family}")
    out = save_linearized(model, tmp_path / "export")
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    base = tiny_model(family).config.model_type  # gemma3_text for Gemma 3's text model
    assert type(loaded) is type(model) and loaded.config.model_type == f"linearized_{base}"
    ids = torch.randint(1, 96, (1, 17))
    with torch.no_grad():
        assert rel_err(loaded(ids, use_cache=False).logits, model(ids, use_cache=False).logits) == 0.0


def test_config_records_settings(tmp_path):
    model = linearize_model(tiny_model("llama"), linear_config(window=16, softmax_layers=[0]), teacher="x/y")
    out = save_linearized(model, tmp_path / "e")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "linearized_llama"
    assert cfg["linearize"]["window"] == 16 and cfg["linearize"]["softmax_layers"] == [0]
    assert cfg["linearize"]["teacher"] == "x/y" and cfg["linearize"]["linearize_version"]
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_linearize.LinearizedLlamaForCausalLM"


def test_existing_export_not_overwritten(tmp_path):
    from linearize.errors import LinearizeError

    model = linearize_model(tiny_model("llama"), linear_config())
    out = save_linearized(model, tmp_path / "e")
    with pytest.raises(LinearizeError, match="--overwrite"):
        save_linearized(model, out)
    save_linearized(model, out, overwrite=True)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left behind


def test_gpt2_random_weights_with_real_tokenizer(gpt2_tokenizer, tmp_path):
    """GPT-2 has no real weights offline: random weights, the real GPT-2 BPE tokenizer."""
    from transformers import AutoModelForCausalLM, GPT2Config

    import linearize  # noqa: F401

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(gpt2_tokenizer), n_embd=64, n_layer=2, n_head=4, n_positions=128)
    model = linearize_model(AutoModelForCausalLM.from_config(cfg).eval(), linear_config(window=8))
    enc = gpt2_tokenizer(["The quick brown fox jumps over", "Hello"], return_tensors="pt", padding=True,
                         padding_side="left")
    out = model.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=gpt2_tokenizer.pad_token_id)
    assert out.shape[1] == enc["input_ids"].shape[1] + 8
    save_linearized(model, tmp_path / "g", tokenizer=gpt2_tokenizer)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "g")
    out2 = loaded.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=gpt2_tokenizer.pad_token_id)
    assert torch.equal(out, out2)


def test_real_stories260k_convert_parity_and_export(stories_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(stories_dir)
    teacher = AutoModelForCausalLM.from_pretrained(stories_dir, attn_implementation="eager").eval()
    ids = tok("Once upon a time, there was a little girl named Lily.", return_tensors="pt")["input_ids"]
    model = linearize_model(teacher, linear_config(window=8), teacher=str(stories_dir))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        out = model(ids[:, :4], use_cache=True)
        cache, logits = output_cache(out), [out.logits]
        for t in range(4, ids.shape[1]):
            out = model(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
            logits.append(out.logits)
    assert rel_err(torch.cat(logits, 1), full) < 1e-5
    out_dir = save_linearized(model, tmp_path / "s", tokenizer=tok)
    got = _load_in_subprocess("remote_code", out_dir, ids)
    assert rel_err(torch.tensor(got["logits"]).view_as(full), full) == 0.0
    assert (out_dir / "tokenizer.json").is_file()
    # the cached generate() of the export picks, token for token, the argmax of a full forward over all so far
    loaded = AutoModelForCausalLM.from_pretrained(out_dir).eval()
    gen = loaded.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=0)
    seq = ids
    with torch.no_grad():
        for _ in range(24):
            nxt = loaded(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    assert gen.tolist() == seq.tolist()
    assert len(set(gen[0, ids.shape[1]:].tolist())) > 3  # a real continuation, not one token repeated
