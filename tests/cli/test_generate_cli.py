"""`linearize generate` on the real stories260K model (in-process): streamed text equals the non-streamed greedy
decode, prompts and generated text verbatim, Ctrl-C keeps the text so far (exit 130), a warning past the trained
context, and bad sampling flags refused before anything loads."""

from __future__ import annotations

import os
import signal

import pytest
from typer.testing import CliRunner

import linearize.cli.main as cli
from tests.conftest import linear_config

runner = CliRunner()


def invoke(*args):
    return runner.invoke(cli.app, ["generate", *map(str, args)])


@pytest.fixture(scope="module", autouse=True)
def no_loading_bars():
    """As `linearize` runs (main() turns transformers' progress bars off before it loads): stderr holds only ours."""
    from transformers.utils import logging

    was_on = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    yield
    if was_on:
        logging.enable_progress_bar()


@pytest.fixture(scope="module")
def stories():
    from tests.conftest import STORIES

    if not (STORIES / "config.json").is_file():
        pytest.skip(f"real stories260K model not found at {STORIES} (set LINEARIZE_SHARED to the shared/ folder)")
    from linearize.io.loading import load_model

    model, tok = load_model(STORIES)
    return STORIES, model, tok


def greedy_continuation(model, tok, prompt: str, n: int) -> str:
    """What non-streamed greedy decoding appends to ``prompt``: the whole sequence decoded, less the prompt's."""
    enc = tok(prompt, return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
    prompt_text = tok.decode(enc["input_ids"][0], skip_special_tokens=True)
    full = tok.decode(out[0], skip_special_tokens=True)
    assert full.startswith(prompt_text)
    return full[len(prompt_text):]


def test_streamed_output_equals_greedy_decode(stories):
    path, model, tok = stories
    prompt = "The dog"
    r = invoke(path, "--prompt", prompt, "--max-new-tokens", 40, "--device", "cpu")
    assert r.exit_code == 0, r.output
    expected = greedy_continuation(model, tok, prompt, 40)
    assert expected.startswith(" was")  # the first new word keeps its space (decoding the new tokens alone drops it)
    assert r.stdout == prompt + expected + "\n"
    assert "warning" not in r.stderr


def test_stream_writes_token_by_token_and_keeps_markup_verbatim(stories):
    """TextStream writes as tokens arrive (many writes, not one at the end) and its pieces add up to one decode of
    the whole text, markup-looking text included."""
    _, _, tok = stories
    pieces = []

    class Out:
        def write(self, text):
            pieces.append(text)

        def flush(self):
            pass

    text = 'Tim said, "The end [/INST] and [bold]x[/] :smile:"\nThen they played.'
    ids = tok(text)["input_ids"]
    prompt, new = ids[:4], ids[4:]
    stream = cli.TextStream(tok, prompt, Out())
    import torch

    stream.put(torch.tensor([prompt]))  # generate() passes the prompt first
    for i in new:
        stream.put(torch.tensor([i]))
    stream.end()
    assert len(pieces) > len(new) // 2
    assert stream.tokens == len(new)
    expected = tok.decode(ids, skip_special_tokens=True)[len(tok.decode(prompt, skip_special_tokens=True)):]
    assert "".join(pieces) == expected + "\n" and "[/INST] and [bold]x[/] :smile:" in expected


def test_prompt_with_markup_is_echoed_verbatim(stories):
    path, model, tok = stories
    prompt = "See note [1] and [eval] here, a [/] b"
    r = invoke(path, "--prompt", prompt, "--max-new-tokens", 8)
    assert r.exit_code == 0, r.output
    assert r.stdout == prompt + greedy_continuation(model, tok, prompt, 8) + "\n"


def test_ctrl_c_keeps_the_text_so_far(stories, monkeypatch, sigint_default):
    """A real SIGINT after the 5th new token: the 5 tokens' text is on stdout, one line on stderr, status 130."""
    path, model, tok = stories
    put = cli.TextStream.put

    def put_then_sigint(self, value):
        put(self, value)
        if self.tokens == 5:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(cli.TextStream, "put", put_then_sigint)
    prompt = "Once upon a time"
    r = invoke(path, "--prompt", prompt, "--max-new-tokens", 200)
    assert r.exit_code == 130, r.output
    assert r.stdout == prompt + greedy_continuation(model, tok, prompt, 5) + "\n"
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("interrupted:") and "after 5 new tokens" in lines[0], r.stderr


def test_warns_past_the_trained_context(stories):
    path, model, tok = stories  # max_position_embeddings 512
    prompt = "Once upon a time there was a dog. " * 40
    n_prompt = len(tok(prompt)["input_ids"])
    assert 400 < n_prompt < 512
    r = invoke(path, "--prompt", prompt, "--max-new-tokens", 520 - n_prompt)
    assert r.exit_code == 0, r.output
    warnings = [ln for ln in r.stderr.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1 and "512-token context" in warnings[0] and f"= {520:,} tokens" in warnings[0], r.stderr
    assert "warning" not in r.stdout


def test_warns_past_the_teachers_context_for_an_export(stories, tmp_path):
    from linearize.convert.surgery import linearize_model
    from linearize.export.writer import save_linearized

    path, model, tok = stories
    from linearize.io.loading import load_model

    teacher, _ = load_model(path)
    save_linearized(linearize_model(teacher, linear_config(window=0)), tmp_path / "e", tokenizer=tok)
    r = invoke(tmp_path / "e", "--prompt", "Once upon a time there was a dog. " * 40, "--max-new-tokens", 120)
    assert r.exit_code == 0, r.output
    assert "512-token context its teacher was trained on" in r.stderr, (r.stdout[:300], r.stderr)


@pytest.mark.parametrize("flags, says", [
    (["--top-p", "0"], "--top-p"), (["--top-p", "1.5"], "--top-p"), (["--top-p", "nan"], "--top-p"),
    (["--top-k", "-1"], "--top-k"), (["--temperature", "-1"], "--temperature"),
    (["--max-new-tokens", "0"], "--max-new-tokens"), (["--dtype", "fp8"], "--dtype 'fp8'"),
    (["--device", "tpu"], "--device 'tpu'"),
])
def test_bad_flags_one_error_line_before_loading(tmp_path, flags, says):
    r = invoke(tmp_path / "no-such-model", *flags)  # a missing model: the flag is checked first
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {says}"), r.stderr
    assert r.stdout == ""


def test_sampling_flags_reach_generate(stories):
    """top-k 1 is greedy whatever the temperature: the sampled text equals the greedy one."""
    path, model, tok = stories
    prompt = "The dog"
    r = invoke(path, "--prompt", prompt, "--max-new-tokens", 20, "--temperature", 5, "--top-k", 1, "--top-p", 1,
               "--dtype", "float32", "--seed", 3)
    assert r.exit_code == 0, r.output
    assert r.stdout == prompt + greedy_continuation(model, tok, prompt, 20) + "\n"
