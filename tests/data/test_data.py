"""Calibration data: readers for every file format and record format, packing, teacher sampling, and errors."""

from __future__ import annotations

import gzip
import json
import lzma
import sys
import types
from pathlib import Path

import pytest
import torch

from linearize.data import (
    build_calibration,
    read_chat_texts,
    read_texts,
    record_to_messages,
    sample_teacher_tokens,
)
from linearize.errors import ConfigError, DataError
from tests.conftest import SHARED, tiny_model

TRAIN_TEXT = SHARED / "train-text"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def train_text() -> Path:
    if not (TRAIN_TEXT / "alpaca-cleaned").is_dir():
        pytest.skip(f"real training text not found at {TRAIN_TEXT} (set LINEARIZE_SHARED to the shared/ folder)")
    return TRAIN_TEXT


@pytest.fixture
def stories_tok(stories_dir: Path):
    from linearize.io.loading import load_tokenizer

    return load_tokenizer(stories_dir)


def _write_jsonl(path: Path, records: list, opener=open) -> Path:
    with opener(path, "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return path


def _first(path: Path) -> str:
    return next(read_texts(path))


# -- readers -----------------------------------------------------------------------------------------------------


def test_txt_jsonl_json_and_compression(tmp_path: Path):
    (tmp_path / "a.txt").write_text("plain text file")
    _write_jsonl(tmp_path / "b.jsonl", [{"text": "one"}, {"text": ""}, {"text": "two"}])
    (tmp_path / "c.json").write_text(json.dumps([{"text": "three"}, "four"]))
    (tmp_path / "d.json").write_text(json.dumps({"text": "single record"}))
    _write_jsonl(tmp_path / "e.jsonl.xz", [{"text": "xz"}], opener=lzma.open)
    _write_jsonl(tmp_path / "f.jsonl.gz", [{"text": "gz"}], opener=gzip.open)
    with lzma.open(tmp_path / "g.txt.xz", "wt") as f:
        f.write("compressed txt")
    assert list(read_texts(tmp_path)) == ["plain text file", "one", "two", "three", "four", "single record", "xz",
                                          "gz", "compressed txt"]
    assert list(read_texts(tmp_path / "b.jsonl")) == ["one", "two"]


def test_folder_is_recursive_sorted_and_skips_other_files(tmp_path: Path):
    (tmp_path / "z").mkdir()
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "z" / "1.txt").write_text("last")
    (tmp_path / "a" / "b" / "2.txt").write_text("first")
    (tmp_path / "README.md").write_text("# not data")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "x.txt").write_text("hidden")
    assert list(read_texts(tmp_path)) == ["first", "last"]


def test_limit_chars(tmp_path: Path):
    _write_jsonl(tmp_path / "x.jsonl", [{"text": "abcdef"}, {"text": "ghijkl"}, {"text": "never read"}])
    assert list(read_texts(tmp_path / "x.jsonl", limit_chars=9)) == ["abcdef", "ghi"]


def test_parquet(tmp_path: Path):
    pa = pytest.importorskip("pyarrow", reason="pyarrow is the optional parquet reader (linearize[data])")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["row one", "row two"], "id": [1, 2]}), tmp_path / "t.parquet")
    pq.write_table(pa.table({"question": ["2+2?"], "answer": ["4"]}), tmp_path / "u.parquet")
    with open(tmp_path / "t.parquet", "rb") as src, lzma.open(tmp_path / "v.parquet.xz", "wb") as dst:
        dst.write(src.read())
    assert list(read_texts(tmp_path)) == ["row one", "row two", "2+2?\n\n4", "row one", "row two"]


def test_parquet_without_pyarrow(tmp_path: Path, monkeypatch):
    (tmp_path / "t.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(DataError, match=r"needs pyarrow: pip install 'linearize\[data\]'"):
        list(read_texts(tmp_path / "t.parquet"))


def test_instruction_and_chat_records():
    alpaca = {"instruction": "Add.", "input": "2 and 3", "output": "5"}
    assert record_to_messages(alpaca) == [{"role": "user", "content": "Add.\n\n2 and 3"},
                                          {"role": "assistant", "content": "5"}]
    lima = {"instruction": "And now?", "input": "", "output": "Done.", "history": [["Hi", "Hello"]]}
    assert [m["content"] for m in record_to_messages(lima)] == ["Hi", "Hello", "And now?", "Done."]
    sharegpt = {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}
    openai = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]}
    assert [m["role"] for m in record_to_messages(sharegpt)] == ["user", "assistant"]
    assert [m["role"] for m in record_to_messages(openai)] == ["system", "user"]
    p3 = {"template": "t", "prompt": "Is it?", "completion": "yes<|endoftext|>"}
    assert record_to_messages(p3)[1] == {"role": "assistant", "content": "yes"}
    assert record_to_messages({"question": "q", "answer": "a"})[0]["content"] == "q"
    assert record_to_messages({"prompt": "p", "response": "r"})[1]["content"] == "r"
    assert record_to_messages({"title": "x", "body": "y"}) is None


@pytest.mark.parametrize("subfolder,expect", [
    ("alpaca-cleaned", "Give three tips for staying healthy.\n\n1.Eat a balanced diet"),
    ("lima", "Can brain cells move?"),
    ("gsm8k-train", "Natalia sold clips to 48 of her friends"),
    ("p3-t0-train-50k", "Given the following passage"),
    ("oasst1-en", "Can you write a short introduction"),
    ("c4-demo", "Don’t think you need all the bells"),
    ("wikipedia-2018-new-articles", "Jarred Shaw (born September 28, 1990)"),
])
def test_real_train_text_formats(train_text: Path, subfolder: str, expect: str):
    text = next(read_texts(train_text / subfolder, limit_chars=2000))
    assert text.startswith(expect), text[:200]


def test_real_lima_history_and_p3_end_marker(train_text: Path):
    lima = json.load(lzma.open(train_text / "lima" / "lima.json.xz", "rt"))
    with_history = next(r for r in lima if r["history"])
    assert len(record_to_messages(with_history)) == 2 * len(with_history["history"]) + 2
    p3 = list(read_texts(train_text / "p3-t0-train-50k", limit_chars=20_000))
    assert len(p3) > 3 and not any("<|endoftext|>" in t for t in p3)


def test_chat_template_rendering(tmp_path: Path, gpt2_tokenizer):
    tok = gpt2_tokenizer
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    _write_jsonl(tmp_path / "x.jsonl", [{"instruction": "Hi", "input": "", "output": "Yo"}, {"text": "raw"}])
    assert list(read_chat_texts(tmp_path / "x.jsonl", tok)) == ["<user>Hi\n<assistant>Yo\n", "raw"]
    calib = build_calibration(tok, source=tmp_path / "x.jsonl", n_tokens=4, seq_len=4, chat_template=True,
                              val_fraction=0.5)
    assert calib.train.shape == (1, 4) and "chat template" in calib.source_desc
    tok.chat_template = None
    with pytest.raises(DataError, match="no chat template"):
        read_chat_texts(tmp_path / "x.jsonl", tok)


# -- packing -----------------------------------------------------------------------------------------------------


def test_packing_shapes_split_and_seed(stories_tok, tmp_path: Path):
    _write_jsonl(tmp_path / "d.jsonl", [{"text": f"Story {i}: the cat sat on the mat and ran {i} times."}
                                        for i in range(200)])
    a = build_calibration(stories_tok, source=tmp_path, n_tokens=2000, seq_len=64, val_fraction=0.2, seed=0)
    assert a.train.shape == (32, 64) and a.valid.shape == (8, 64)  # ceil(2000/64)=32; 32 * 0.2/0.8 = 8
    assert a.train.dtype == torch.long and a.n_tokens == 40 * 64
    train_rows = {tuple(r) for r in a.train.tolist()}
    assert not train_rows & {tuple(r) for r in a.valid.tolist()}  # held-out blocks are disjoint
    b = build_calibration(stories_tok, source=tmp_path, n_tokens=2000, seq_len=64, val_fraction=0.2, seed=0)
    c = build_calibration(stories_tok, source=tmp_path, n_tokens=2000, seq_len=64, val_fraction=0.2, seed=1)
    assert torch.equal(a.train, b.train) and torch.equal(a.valid, b.valid)
    assert not torch.equal(a.train, c.train)
    assert {tuple(r) for r in torch.cat([a.train, a.valid]).tolist()} == \
           {tuple(r) for r in torch.cat([c.train, c.valid]).tolist()}  # same blocks, other order
    # Every document is BOS ... EOS: the stream alternates them.
    flat = torch.cat([a.train, a.valid]).flatten().tolist()
    assert flat.count(stories_tok.bos_token_id) >= 40 and flat.count(stories_tok.eos_token_id) >= 40
    assert stories_tok.decode(a.train[0]).count("Story") >= 1
    assert "documents" in a.source_desc


def test_packing_stops_reading_early(stories_tok, tmp_path: Path, monkeypatch):
    _write_jsonl(tmp_path / "big.jsonl", [{"text": "word " * 500} for _ in range(1000)])
    calls = []
    real = type(stories_tok).__call__
    monkeypatch.setattr(type(stories_tok), "__call__", lambda self, texts, **k: calls.append(len(texts)) or
                        real(self, texts, **k))
    calib = build_calibration(stories_tok, source=tmp_path, n_tokens=1000, seq_len=100)
    assert calib.train.shape == (10, 100) and calib.valid.shape == (1, 100)
    assert sum(calls) < 20, f"tokenized {sum(calls)} documents for 1,100 tokens"


def test_reading_and_tokenizing_shows_progress(stories_tok, tmp_path: Path):
    """Reading and tokenizing the data is a task counted in tokens (1M tokens took 51 s with nothing shown)."""
    from tests.conftest import RecordingProgress

    _write_jsonl(tmp_path / "d.jsonl", [{"text": f"Story {i}: the cat sat on the mat and ran {i} times."}
                                        for i in range(3000)])
    progress = RecordingProgress()
    build_calibration(stories_tok, source=tmp_path, n_tokens=20_000, seq_len=64, val_fraction=0.2, progress=progress)
    (task,) = progress.tasks
    needed = (313 + 78) * 64  # ceil(20000 / 64) training blocks and 313 * 0.2 / 0.8 validation blocks
    assert task["name"] == "reading and tokenizing the data" and task["unit"] == "tokens" and task["total"] == needed
    assert len(task["done"]) > 1 and task["done"] == sorted(task["done"]) and task["done"][-1] == needed


def test_gpt2_style_tokenizer_separates_documents_with_eos(gpt2_tokenizer, tmp_path: Path):
    (tmp_path / "a.txt").write_text("Hello world")
    (tmp_path / "b.txt").write_text("Hello world")
    calib = build_calibration(gpt2_tokenizer, source=tmp_path, n_tokens=3, seq_len=3, val_fraction=0.5, max_len=1024)
    assert sorted(torch.cat([calib.train, calib.valid]).tolist()) == [[15496, 995, 50256]] * 2


def test_short_data_uses_what_there_is(stories_tok, tmp_path: Path):
    _write_jsonl(tmp_path / "d.jsonl", [{"text": "The cat sat. " * 20} for _ in range(5)])
    with pytest.warns(UserWarning, match="gives only"):
        calib = build_calibration(stories_tok, source=tmp_path, n_tokens=100_000, seq_len=32, val_fraction=0.1)
    assert calib.train.shape[0] >= 1 and calib.valid.shape[0] >= 1


def test_blocks_start_with_bos_where_documents_do(stories_tok, tmp_path: Path):
    """A BOS-adding tokenizer's blocks all start with BOS (as eval's windows and users' prompts), a document's own BOS
    serving as it where one falls on a block's start, never two in a row; other tokenizers' streams are cut as
    they are."""
    from linearize.data.packing import _cut_blocks

    B = 1
    stream = [B, 5, 6, 7, 8, 9, 2, B, 10, 11, 12, 13, 2, B, 14]  # three documents
    assert _cut_blocks(stream, 4, 3, B).tolist() == [[B, 5, 6, 7], [B, 8, 9, 2], [B, 10, 11, 12]]
    assert _cut_blocks(stream[1:], 4, 3, B).tolist() == [[B, 5, 6, 7], [B, 8, 9, 2], [B, 10, 11, 12]]
    assert _cut_blocks(stream, 4, 3, None).tolist() == [stream[0:4], stream[4:8], stream[8:12]]
    _write_jsonl(tmp_path / "d.jsonl", [{"text": f"Story {i}: the cat sat on the mat and then it ran." * 3}
                                        for i in range(40)])
    calib = build_calibration(stories_tok, source=tmp_path, n_tokens=600, seq_len=30, val_fraction=0.1)
    bos = stories_tok.bos_token_id
    assert stories_tok("a")["input_ids"][0] == bos  # the Llama tokenizer adds BOS
    for blocks in (calib.train, calib.valid):
        assert (blocks[:, 0] == bos).all() and not ((blocks[:, 1:] == bos) & (blocks[:, :-1] == bos)).any()


# -- teacher sampling --------------------------------------------------------------------------------------------


def test_teacher_sampling_tiny_random_llama(stories_tok):
    model = tiny_model("llama", vocab_size=512)
    docs = sample_teacher_tokens(model, stories_tok, n_tokens=300, seq_len=40, batch_size=4, seed=3)
    assert sum(d.numel() for d in docs) >= 300 and all(d.numel() <= 40 and d[0] == 1 for d in docs)
    again = sample_teacher_tokens(model, stories_tok, n_tokens=300, seq_len=40, batch_size=4, seed=3)
    other = sample_teacher_tokens(model, stories_tok, n_tokens=300, seq_len=40, batch_size=4, seed=4)
    assert all(torch.equal(x, y) for x, y in zip(docs, again)) and len(docs) == len(again)
    assert not all(torch.equal(x, y) for x, y in zip(docs, other))
    assert model.config._attn_implementation == "eager"  # restored after sampling on SDPA
    state = torch.get_rng_state()
    calib = build_calibration(stories_tok, source=None, model=model, n_tokens=200, seq_len=20, sample_batch_size=4)
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is left alone
    assert calib.train.shape == (10, 20) and calib.valid.shape == (1, 20) and "sampled" in calib.source_desc


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen3"])
def test_sampling_batch_from_kv_bytes(family, monkeypatch):
    """The automatic sampling batch: 64 on the CPU; on CUDA all documents needed, as far as their KV cache fits a
    quarter of the GPU's memory (the GPU's memory is faked: the arithmetic is under test; tests/gpu samples for real)."""
    from linearize.data import sampling

    model = tiny_model(family)
    cfg = model.config
    layers = getattr(cfg, "num_hidden_layers", None) or cfg.n_layer
    heads = getattr(cfg, "num_attention_heads", None) or cfg.n_head
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or (getattr(cfg, "hidden_size", None) or cfg.n_embd) // heads
    per_token = sampling.kv_bytes_per_token(model)
    assert per_token == 2 * layers * kv * head_dim * 4  # fp32
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert sampling.auto_batch_size(per_token, 512, 500, cpu) == 64
    assert sampling.auto_batch_size(per_token, 512, 10, cpu) == 10
    props = types.SimpleNamespace(total_memory=4 * per_token * 512 * 300)  # a quarter holds 300 documents
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    assert [sampling.auto_batch_size(per_token, 512, n, cuda) for n in (200, 500, 5000)] == [200, 300, 300]
    assert sampling.auto_batch_size(per_token, 2048, 500, cuda) == 75  # 4x longer documents, 4x fewer
    assert sampling.auto_batch_size(None, 512, 500, cuda) == 64  # a config that does not say


def test_teacher_sampling_resumes_after_a_kill(stories_tok, tmp_path: Path, monkeypatch):
    """A kill while the teacher samples keeps every finished batch; the rerun continues with the RNG state saved
    after them and ends with exactly the documents of an uninterrupted run."""
    model = tiny_model("llama", vocab_size=512)
    ref = sample_teacher_tokens(model, stories_tok, n_tokens=300, seq_len=40, batch_size=2, seed=3)
    real, calls = model.generate, []

    def killed_on_the_4th_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(model, "generate", killed_on_the_4th_batch)
    with pytest.raises(KeyboardInterrupt):
        sample_teacher_tokens(model, stories_tok, n_tokens=300, seq_len=40, batch_size=2, seed=3,
                              resume_dir=tmp_path / "s")
    assert json.loads((tmp_path / "s" / "meta.json").read_text())["step"] == 3
    monkeypatch.setattr(model, "generate", real)
    calls.clear()
    got = sample_teacher_tokens(model, stories_tok, n_tokens=300, seq_len=40, batch_size=2, seed=3,
                                resume_dir=tmp_path / "s")
    assert len(got) == len(ref) and all(torch.equal(a, b) for a, b in zip(got, ref))
    # other settings do not pick up the saved progress
    other = sample_teacher_tokens(model, stories_tok, n_tokens=300, seq_len=40, batch_size=2, seed=4,
                                  resume_dir=tmp_path / "s")
    assert not all(torch.equal(a, b) for a, b in zip(other, ref))


def test_teacher_sampling_with_prompts(stories_tok):
    model = tiny_model("llama", vocab_size=512)
    docs = sample_teacher_tokens(model, stories_tok, n_tokens=100, seq_len=16, batch_size=2,
                                 prompts=["Once upon a time", "The dog"])
    prefixes = [stories_tok.decode(d[:6], skip_special_tokens=True) for d in docs]
    assert any(p.startswith("Once upon") for p in prefixes) and any(p.startswith("The dog") for p in prefixes)


def test_teacher_sampling_stories260k(stories_dir: Path):
    from linearize.io.loading import load_model

    model, tok = load_model(stories_dir)
    calib = build_calibration(tok, source=None, model=model, n_tokens=8192, seq_len=128, seed=0)
    assert calib.train.shape == (64, 128) and calib.valid.shape == (3, 128)
    text = tok.decode(torch.cat([calib.train, calib.valid]).flatten())
    # A real TinyStories model writes English stories: its most frequent words turn up.
    assert sum(text.count(w) for w in (" the ", " was ", " she ", " he ")) > 50, text[:300]


# -- errors ------------------------------------------------------------------------------------------------------


def test_missing_and_empty_sources(tmp_path: Path):
    with pytest.raises(DataError, match="does not exist"):
        list(read_texts(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match="does not exist"):
        list(read_texts("./no/such/dir"))
    (tmp_path / "notes.md").write_text("x")
    with pytest.raises(DataError, match=r"holds no readable data files.*notes\.md"):
        list(read_texts(tmp_path))
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(DataError, match="contains no text"):
        list(read_texts(tmp_path))
    with pytest.raises(DataError, match="unsupported file type"):
        list(read_texts(tmp_path / "notes.md"))


def test_unknown_record_format_names_file_and_keys(tmp_path: Path):
    path = _write_jsonl(tmp_path / "odd.jsonl", [{"text": "fine"}, {"title": "t", "body": "b"}])
    with pytest.raises(DataError, match=r"odd\.jsonl:2: unknown record format with keys \['body', 'title'\]"):
        list(read_texts(path))
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: not valid JSON"):
        list(read_texts(tmp_path / "bad.jsonl"))


def test_hf_dataset_names(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DataError, match="not an existing file or folder.*`datasets`"):
        list(read_texts("wikitext"))
    fake = types.ModuleType("datasets")

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'someone/corpus' on the Hub\n(LocalEntryNotFoundError)")

    fake.load_dataset = offline
    monkeypatch.setitem(sys.modules, "datasets", fake)
    with pytest.raises(DataError, match=r"could not load HF dataset 'someone/corpus' \(Couldn't reach") as err:
        list(read_texts("someone/corpus"))
    assert "\n" not in str(err.value)
    fake.load_dataset = lambda repo, config, split, streaming: iter([{"text": "a"}, {"question": "q", "answer": "b"}])
    assert list(read_texts("someone/corpus:cfg")) == ["a", "q\n\nb"]


def test_seq_len_longer_than_context(stories_tok):
    model = tiny_model("llama", vocab_size=512)  # max_position_embeddings=256
    with pytest.raises(DataError, match="seq_len 300 is longer than the model's context of 256 tokens"):
        build_calibration(stories_tok, source=None, model=model, n_tokens=1000, seq_len=300)
    with pytest.raises(DataError, match="seq_len 600 .* context of 512"):
        build_calibration(stories_tok, source="unused", n_tokens=1000, seq_len=600, max_len=512)


def test_too_little_data_says_found_and_needed(stories_tok, tmp_path: Path):
    (tmp_path / "tiny.txt").write_text("The cat sat.")
    with pytest.raises(DataError, match=r"gives only \d+ tokens; at least 128 are needed"):
        build_calibration(stories_tok, source=tmp_path, n_tokens=1000, seq_len=64)


def test_bad_options(stories_tok):
    with pytest.raises(DataError, match="needs model="):
        build_calibration(stories_tok, source=None, n_tokens=100, seq_len=10)
    with pytest.raises(ConfigError, match="val_fraction"):
        build_calibration(stories_tok, source=None, n_tokens=100, seq_len=10, val_fraction=1.5)
    with pytest.raises(ConfigError, match="temperature"):
        sample_teacher_tokens(tiny_model("llama", vocab_size=512), stories_tok, n_tokens=10, seq_len=8,
                              temperature=0)


def test_a_list_of_sources_is_mixed_evenly_by_characters_with_documents_whole(tmp_path: Path):
    """Each next document comes from the source that has given the fewest characters: a source of one long book
    and one of many short articles alternate by size, not by count; the book is never cut."""
    books = tmp_path / "books.jsonl"
    books.write_text("\n".join(json.dumps({"text": c * 300}) for c in "AB") + "\n")
    wiki = tmp_path / "wiki.jsonl"
    wiki.write_text("\n".join(json.dumps({"text": f"w{i} " * 25}) for i in range(30)) + "\n")  # 75-100 chars each
    from linearize.data import read_texts

    docs = list(read_texts([str(books), str(wiki)]))
    assert len(docs) == 32 and docs[0] == "A" * 300
    first_b = next(i for i, d in enumerate(docs) if d.startswith("B"))
    chars_of_wiki_before_b = sum(len(d) for d in docs[:first_b] if d.startswith("w"))
    assert 300 <= chars_of_wiki_before_b < 300 + 100  # the book's 300 characters, matched by articles first
    assert docs[-1].startswith("w")  # the books run out first; the rest are articles
    cut = list(read_texts([str(books), str(wiki)], limit_chars=350))
    assert [len(d) for d in cut] == [300, 50] and cut[1].startswith("w0 w0")  # cut at the limit
    single = list(read_texts(str(wiki)))
    assert list(read_texts([str(wiki)])) == single


def test_data_mixture_setting_from_recipe_and_cli_text():
    from linearize.cli.options import _parse
    from linearize.finetune.config import FinetuneConfig

    ann = FinetuneConfig.model_fields["data"].annotation
    assert FinetuneConfig.build(data=_parse(ann, "a,b", "data")).data == ["a", "b"]
    assert FinetuneConfig.build(data=_parse(ann, "a", "data")).data == "a"  # one source stays a string
    with pytest.raises(ConfigError, match="at least one source"):
        FinetuneConfig.build(data=[])
