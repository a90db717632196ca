"""Rebuild the quickstart's text files in linearize/data/text/ from the shared data folder (provenance of what ships).

    python3 scripts/make_quickstart_text.py [SHARED_DATA]      # default: ../shared/data beside the repository

- ``calibration-en.jsonl``: attention-transfer text, one ``{"text", "source"}`` record per document, alternating
  between excerpts of public-domain Project Gutenberg books (train-text/gutenberg-books) and runs of consecutive
  English OpenAssistant oasst1 messages (train-text/oasst1-en, Apache-2.0), so that any prefix of the file mixes
  the two (the calibration reader takes documents in file order until it has enough tokens).
- ``wikitext-valid-head.txt``: the first articles of WikiText-103's validation split, unchanged (CC BY-SA 3.0), the
  quickstart's held-out text: neither source above contains Wikipedia text, and the script checks that no 64-character
  span of it occurs in the calibration file.

Deterministic: the same inputs give byte-identical files.
"""

from __future__ import annotations

import json
import lzma
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "linearize" / "data" / "text"

#: Gutenberg titles (as the shared file spells them): fiction, essays, science, history and politics
BOOKS = [
    "Pride and Prejudice", "From Newton to Einstein", "The Adventures of Sherlock Holmes",
    "Autobiography of Benjamin Franklin", "A Tale of Two Cities", "Great Astronomers",
    "Walden, and On The Duty Of Civil Disobedience", "The Time Machine", "The Souls of Black Folk",
    "Three Men in a Boat", "Democracy In America, Volume 1 (of 2)", "Anne of Green Gables",
    "The Narrative of the Life of Frederick Douglass", "Treasure Island", "The Wonderful Wizard of Oz",
    "The War of the Worlds", "Middlemarch", "The Art of War", "Moby Dick; or The Whale", "Second Treatise of Government",
]
EXCERPT_CHARS = 4000
EXCERPTS_AT = (0.3, 0.6)  # where in each book the excerpts start (fractions of its length)
OASST_DOC_CHARS = 3000
OASST_FIRST = 1000  # skip the first messages (a few long trees) so the runs cover many conversations
WIKI_LINES = 132  # lines 1..132 of wiki.valid.raw: its first four articles (Homarus gammarus .. Shikamaru Nara)


def _excerpt(text: str, at: float) -> str:
    """About EXCERPT_CHARS characters from ``at`` into ``text``, from a paragraph start to a paragraph end."""
    start = text.find("\n\n", int(len(text) * at)) + 2
    end = text.rfind("\n\n", start, start + EXCERPT_CHARS)
    excerpt = text[start:end if end > start else start + EXCERPT_CHARS].strip()
    # the books are wrapped at ~70 characters: one line per paragraph, as running text is elsewhere
    return "\n\n".join(" ".join(p.split()) for p in excerpt.split("\n\n"))


def books(shared: Path) -> list[dict]:
    found = {}
    with lzma.open(shared / "train-text/gutenberg-books/gutenberg_books_en.jsonl.xz", "rt") as f:
        for line in f:
            rec = json.loads(line)
            if rec["title"] in BOOKS and rec["title"] not in found:
                found[rec["title"]] = rec
    missing = [t for t in BOOKS if t not in found]
    if missing:
        raise SystemExit(f"not in the Gutenberg file: {missing}")
    docs = []
    for at in EXCERPTS_AT:
        for title in BOOKS:
            rec = found[title]
            no = f" (Project Gutenberg #{rec['pg_ebook_no']})" if rec["pg_ebook_no"] else " (Project Gutenberg)"
            docs.append({"text": _excerpt(rec["text"], at), "source": f"{title}{no}"})
    return docs


def conversations(shared: Path, n_docs: int) -> list[dict]:
    docs, run, size = [], [], 0
    with lzma.open(shared / "train-text/oasst1-en/oasst1_en_train_messages.jsonl.xz", "rt") as f:
        for i, line in enumerate(f):
            if i < OASST_FIRST:
                continue
            rec = json.loads(line)
            run.append(rec)
            size += len(rec["text"])
            if size >= OASST_DOC_CHARS:
                docs.append({"text": "\n\n".join(r["text"].strip() for r in run),
                             "source": f"oasst1 en train messages {run[0]['idx']}-{run[-1]['idx']}"})
                run, size = [], 0
                if len(docs) == n_docs:
                    break
    return docs


def build(shared: Path) -> dict[str, str]:
    """File name -> content of the two files, from the shared data folder."""
    b = books(shared)
    docs = [d for pair in zip(b, conversations(shared, len(b))) for d in pair]
    wiki = (shared / "wikitext-raw/wiki.valid.raw").read_text(encoding="utf-8").splitlines(keepends=True)
    held_out = "".join(wiki[:WIKI_LINES])
    calib = "\n".join(d["text"] for d in docs)
    spans = {held_out[i:i + 64] for i in range(0, len(held_out) - 64, 16)}
    shared_spans = [s for s in spans if s.strip() and s in calib]
    if shared_spans:
        raise SystemExit(f"held-out text occurs in the calibration text: {shared_spans[:3]}")
    return {"calibration-en.jsonl": "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs),
            "wikitext-valid-head.txt": held_out}


def main() -> None:
    shared = Path(sys.argv[1]) if len(sys.argv) > 1 else REPO.parent / "shared" / "data"
    OUT.mkdir(parents=True, exist_ok=True)
    for name, text in build(shared).items():
        (OUT / name).write_text(text, encoding="utf-8")
        print(f"{len(text):,} characters -> {OUT / name}")


if __name__ == "__main__":
    main()
