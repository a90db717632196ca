"""The ablation table of ``benchmarks/gpu_ablate_smollm2.sh``: one row per variant folder of OUT (eval.json, wall_s,
the export's config.json), the teacher first; markdown on stdout, the rows as JSON in OUT/ablation.json.

    python benchmarks/ablation_table.py OUT
"""

from __future__ import annotations

import json
from pathlib import Path

from linearize.models.base import split_linearize_dict
from linearize.models.cache import CacheGeometry

CONTEXT = 4096  # the context at which state bytes are compared (the goal: <= 1/4 of the teacher's KV)


def _export_of(folder: Path) -> Path | None:
    for cand in (folder / "export", folder / "run" / "finetuned"):
        if (cand / "config.json").is_file():
            return cand
    return None


def _state(export: Path) -> tuple[int, int, list[int], dict]:
    c = json.loads((export / "config.json").read_text())
    lin, _ = split_linearize_dict(c["linearize"])
    g = CacheGeometry.from_config(c, lin, 2)
    softmax = [i for i in lin.softmax_layers if i < g.n_layers]
    return g.bytes_per_sequence(len(softmax), CONTEXT), g.teacher_bytes(CONTEXT), softmax, lin.to_dict()


def _scores(result: dict) -> dict:
    mc = result.get("mc", {})
    pk = result.get("passkey", {}).get("by_context", {})
    return {
        "ppl": result.get("ppl", {}).get("ppl"),
        "piqa": mc.get("piqa", {}).get("acc_norm"),
        "arc_easy": mc.get("arc_easy", {}).get("acc_norm"),
        "winogrande": mc.get("winogrande", {}).get("acc"),
        "passkey": {int(k): v for k, v in pk.items()},
    }


def rows(out: Path) -> list[dict]:
    table = []
    done = sorted((p for p in out.iterdir() if (p / "eval.json").is_file()),
                  key=lambda p: (p / "eval.json").stat().st_mtime)
    for folder in done:  # in the order they ran
        ev = json.loads((folder / "eval.json").read_text())
        export = _export_of(folder)
        if ev.get("teacher") and not any(r["variant"] == "teacher" for r in table):
            table.insert(0, {"variant": "teacher", **_scores(ev["teacher"]), "state_bytes": None,
                             "wall_s": None, "softmax_layers": None})
        state, teacher, softmax, lin = _state(export) if export else (None, None, None, {})
        wall = (folder / "wall_s").read_text().strip() if (folder / "wall_s").is_file() else None
        table.append({"variant": folder.name, **_scores(ev["model"]), "state_bytes": state,
                      "teacher_kv_bytes": teacher, "softmax_layers": softmax, "sinks": lin.get("sinks"),
                      "window": lin.get("window"), "wall_s": int(wall) if wall else None})
    return table


def markdown(table: list[dict]) -> str:
    teacher = next((r for r in table if r["variant"] == "teacher"), None)
    contexts = sorted({c for r in table for c in r["passkey"]})
    head = ["variant", "WikiText ppl", "× teacher", "PIQA", "ARC-e", "Winogrande",
            *[f"passkey {c:,}" for c in contexts], f"state @ {CONTEXT // 1024}k (MiB)", "× teacher KV",
            "softmax layers", "wall s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    f = lambda x, n=3: "–" if x is None else f"{x:.{n}f}"  # noqa: E731
    for r in table:
        ratio = r["ppl"] / teacher["ppl"] if teacher and r["ppl"] and teacher["ppl"] else None
        kv = r.get("teacher_kv_bytes")
        cells = [r["variant"], f(r["ppl"], 2), f(ratio, 2), f(r["piqa"]), f(r["arc_easy"]), f(r["winogrande"]),
                 *[f(r["passkey"].get(c), 2) for c in contexts],
                 f(r["state_bytes"] / 2**20 if r["state_bytes"] else None, 2),
                 f(r["state_bytes"] / kv if r["state_bytes"] and kv else None, 3),
                 "–" if r["softmax_layers"] is None else str(r["softmax_layers"] or "none"),
                 "–" if r["wall_s"] is None else str(r["wall_s"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    out = Path(argv[0])
    table = rows(out)
    (out / "ablation.json").write_text(json.dumps(table, indent=1))
    print(markdown(table))


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", metavar="OUT", help="the folder of gpu_ablate_smollm2.sh's variant folders")
    main([ap.parse_args().out])
