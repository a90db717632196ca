"""Shared fixtures: tiny random configs of every supported family, and real assets from ../shared (skipped with a
reason when absent, so the core suite runs from the repository alone)."""

from __future__ import annotations

import os

# Triton reads TRITON_INTERPRET when it is first imported, and importing linearize imports it: set it here, before
# any test module imports the package, so the Triton kernels run in the interpreter on machines without a GPU.
if "TRITON_INTERPRET" not in os.environ:
    import torch as _torch

    if not _torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LINEARIZE_SHARED", REPO.parent / "shared")) / "data"
STORIES = SHARED / "stories260K-hf"
GPT2_TOKENIZER = SHARED / "gpt2-tokenizer"

torch.set_num_threads(min(2, torch.get_num_threads()))


def tiny_config(family: str, **overrides):
    """A random config small enough for CPU tests; GQA where the family has it."""
    from transformers import GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

    common = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, attn_implementation="eager")
    if family == "llama":
        cfg = LlamaConfig(**common)
    elif family == "mistral":
        cfg = MistralConfig(**{**common, "sliding_window": None})
    elif family == "qwen2":
        cfg = Qwen2Config(**common)  # q/k/v projections carry a bias
    elif family == "gpt2":
        cfg = GPT2Config(vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_positions=256, attn_implementation="eager",
                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    else:
        raise ValueError(family)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def tiny_model(family: str, seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides)).eval()
    if family == "qwen2":  # make the q/k/v biases matter
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    return model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.fixture
def stories_dir() -> Path:
    if not (STORIES / "config.json").is_file():
        pytest.skip(f"real stories260K model not found at {STORIES} (set LINEARIZE_SHARED to the shared/ folder)")
    return STORIES


SMOLLM2_DESTS = (REPO / "models", Path("/tmp/smol"))
"""Where the real SmolLM2 GGUF is looked for (``--dest`` folders of ``linearize fetch smollm2``): the repository's
models/ (the fetch default run from the repository, and the quickstart's), then an older habit; ``LINEARIZE_SMOLLM2``
(the .gguf, or a --dest folder) replaces both."""


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The real SmolLM2-135M-Instruct GGUF (98 MB, from PyPI), skipped with the command that fetches it."""
    from linearize.loading import SMOLLM2_ENV, find_smollm2

    found = find_smollm2(*SMOLLM2_DESTS)
    if found is None:
        given = os.environ.get(SMOLLM2_ENV, "").strip()
        looked = f"{SMOLLM2_ENV}={given}" if given else ", ".join(str(d) for d in SMOLLM2_DESTS)
        pytest.skip(f"real SmolLM2-135M-Instruct GGUF not found ({looked}): run `linearize fetch smollm2 --dest "
                    f"{REPO / 'models'}` (or bash scripts/quickstart.sh), or set {SMOLLM2_ENV} to the .gguf")
    pytest.importorskip("gguf", reason="the gguf package is needed to read .gguf files")
    return found


@pytest.fixture
def gpt2_tokenizer():
    if not (GPT2_TOKENIZER / "encoder.json").is_file():
        pytest.skip(f"real GPT-2 tokenizer files not found at {GPT2_TOKENIZER}")
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    # transformers 5's GPT2TokenizerFast(vocab_file=..., merges_file=...) no longer reads these files; build the
    # byte-level BPE with `tokenizers` and wrap it.
    bpe = ByteLevelBPETokenizer(str(GPT2_TOKENIZER / "encoder.json"), str(GPT2_TOKENIZER / "vocab.bpe"))
    eot = "<|endoftext|>"
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token=eot, eos_token=eot, pad_token=eot)
    assert len(tok) == 50257 and tok("Hello world")["input_ids"] == [15496, 995]
    return tok


@pytest.fixture
def sigint_default():
    """Python's own Ctrl-C handler for the test, also where the suite runs with SIGINT ignored (a background job of
    a non-interactive shell, as CI may be): the Ctrl-C tests send SIGINT to themselves or to a child."""
    import signal

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)
