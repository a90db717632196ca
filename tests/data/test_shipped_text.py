"""The text that ships in linearize/data/text (the quickstart's calibration and held-out text): readable by the
calibration reader, the held-out text absent from the calibration text, and both rebuilt byte for byte from the
shared data by scripts/make_quickstart_text.py (their provenance)."""

from __future__ import annotations

import importlib.util
import json

import pytest

from linearize.data import read_texts
from tests.conftest import REPO, SHARED

TEXT = REPO / "linearize" / "data" / "text"
CALIBRATION, HELD_OUT = TEXT / "calibration-en.jsonl", TEXT / "wikitext-valid-head.txt"


def test_calibration_text_reads_as_documents_of_both_sources():
    docs = list(read_texts(CALIBRATION))
    assert len(docs) == 80 and min(len(d) for d in docs) > 500
    sources = [json.loads(line)["source"] for line in CALIBRATION.read_text(encoding="utf-8").splitlines()]
    # alternating, so any prefix the reader takes mixes books and conversations
    assert all("Project Gutenberg" in s for s in sources[::2]) and all(s.startswith("oasst1") for s in sources[1::2])


def test_held_out_text_is_not_in_the_calibration_text():
    calibration = "\n".join(read_texts(CALIBRATION))
    held_out = HELD_OUT.read_text(encoding="utf-8")
    assert held_out.startswith(" \n = Homarus gammarus = \n")
    spans = [held_out[i:i + 64] for i in range(0, len(held_out) - 64, 16)]
    assert not [s for s in spans if s.strip() and s in calibration]


def test_shipped_text_is_rebuilt_from_the_shared_data():
    if not (SHARED / "train-text" / "gutenberg-books").is_dir():
        pytest.skip(f"shared data not found at {SHARED} (set LINEARIZE_SHARED to the shared/ folder)")
    spec = importlib.util.spec_from_file_location("make_quickstart_text", REPO / "scripts" / "make_quickstart_text.py")
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    built = builder.build(SHARED)
    assert built == {p.name: p.read_text(encoding="utf-8") for p in (CALIBRATION, HELD_OUT)}
