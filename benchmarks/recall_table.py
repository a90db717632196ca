"""Tabulate ``gpu_recall_smollm2.sh``'s variant folders (``OUT/*/eval.json``) as one markdown table: the teacher and
the two baselines (from the variant evaluated with ``--compare``), then every variant; perplexity (sliding window and
past the window), passkey per context, MQAR overall and at its largest N, cache bytes per sequence.

    python benchmarks/recall_table.py OUT            # prints markdown, writes OUT/recall.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _row(name: str, side: dict) -> dict:
    out = {"name": name}
    if "ppl" in side:
        out["ppl"] = side["ppl"]["ppl"]
    if "distance" in side:
        d = side["distance"]
        out["ppl_blocks"] = d["ppl"]
        if d.get("beyond"):
            out["ppl_beyond"] = d["beyond"]["ppl"]
            out["beyond_from"] = d["beyond"]["from"]
    if side.get("passkey", {}).get("by_context"):
        out["passkey"] = {str(k): v for k, v in side["passkey"]["by_context"].items()}
    if side.get("mqar", {}).get("by_pairs"):
        pairs = side["mqar"]["by_pairs"]
        out["mqar"] = side["mqar"]["acc"]
        n_max = max(pairs, key=int)
        out["mqar_max"] = (n_max, pairs[n_max])
    sb = side["info"]["state_bytes"]
    out["cache_mib"] = (sb["tokens"], sb["bytes"] / 2**20)
    out["seconds"] = round(sum(side.get("seconds", {}).values()), 1)
    return out


def collect(folder: Path) -> list[dict]:
    rows, head = [], []
    for f in sorted(folder.glob("*/eval.json")):
        r = json.loads(f.read_text())
        name = f.parent.name
        rows.append(_row(name, r["model"]))
        if r.get("teacher"):
            head.append(_row("teacher", r["teacher"]))
        for base, side in (r.get("baselines") or {}).items():
            head.append(_row(f"{base} ({name})", side))
    return head + rows


def _fmt(x, nd=3) -> str:
    return "-" if x is None else f"{x:.{nd}f}" if isinstance(x, float) else str(x)


def markdown(rows: list[dict]) -> str:
    ctxs = sorted({c for r in rows for c in r.get("passkey", {})}, key=int)
    cols = ["model", "ppl", "ppl blocks", "ppl past window", *[f"passkey {c}" for c in ctxs], "MQAR", "MQAR max N",
            "cache MiB/seq", "eval s"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        mq = r.get("mqar_max")
        cm = r.get("cache_mib")
        cells = [r["name"], _fmt(r.get("ppl"), 2), _fmt(r.get("ppl_blocks"), 2), _fmt(r.get("ppl_beyond"), 2),
                 *[_fmt(r.get("passkey", {}).get(c), 2) for c in ctxs], _fmt(r.get("mqar"), 3),
                 "-" if mq is None else f"{mq[1]:.3f} (N={mq[0]})", "-" if cm is None else f"{cm[1]:.2f} @{cm[0]}",
                 _fmt(r.get("seconds"), 1)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python benchmarks/recall_table.py OUT", file=sys.stderr)
        return 2
    folder = Path(argv[0])
    rows = collect(folder)
    if not rows:
        print(f"error: no */eval.json under {folder}", file=sys.stderr)
        return 2
    (folder / "recall.json").write_text(json.dumps(rows, indent=2))
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
