"""The eval config (plain, documented fields; every problem reported at once; an import light enough for CLI
generation) and run_eval on the real stories260K teacher against a linearized export of it: side-by-side results
equal to the single evaluations, state bytes from the cache layout, JSON and table."""

from __future__ import annotations

import json
import subprocess
import sys
import types
import typing

import pytest
import torch
from pydantic import ValidationError

from linearize.errors import ConfigError
from linearize.eval import EvalConfig, render_table, run_eval
from tests.conftest import REPO

_PLAIN = {str, int, float, bool, type(None)}


def _plain(annotation) -> bool:
    origin = typing.get_origin(annotation)
    if origin is None:
        return annotation in _PLAIN
    if origin is typing.Literal:
        return all(type(a) in _PLAIN for a in typing.get_args(annotation))
    if origin in (list, typing.Union, types.UnionType):
        return all(_plain(a) for a in typing.get_args(annotation))
    return False


def test_config_fields_are_plain_documented_and_defaulted():
    assert len(EvalConfig.model_fields) >= 20
    for name, field in EvalConfig.model_fields.items():
        assert field.description and "\n" not in field.description, name
        assert not field.is_required(), name
        assert _plain(field.annotation), (name, field.annotation)
    with pytest.raises(ValidationError, match="extra"):
        EvalConfig(modle="x")
    cfg = EvalConfig(model="m")
    with pytest.raises(ValidationError, match="frozen"):
        cfg.context = 5
    assert EvalConfig.model_validate(cfg.model_dump()) == cfg


def test_config_import_loads_neither_torch_nor_transformers():
    code = ("import sys\nfrom linearize.eval import EvalConfig\nimport linearize.eval.config\n"
            "print('torch' in sys.modules, 'transformers' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(REPO), timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["False", "False"]


def test_check_reports_every_problem_by_field():
    cfg = EvalConfig(tasks=["ppl", "mc", "passkey"], context=1, stride=3, passkey_depths=[0.5, 1.5], mqar_pairs=[0],
                     batch_size=0, limit=0)
    with pytest.raises(ConfigError) as err:
        cfg.check()
    message = str(err.value)
    for field in ("model is not set", "text is not set", "mc_files is empty", "context=1", "stride=3",
                  "passkey_depths [1.5]", "mqar_pairs [0]", "batch_size=0", "limit=0"):
        assert field in message, field
    assert "\n" not in message


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: device=cuda is valid here")
def test_cuda_without_a_gpu_is_a_config_error():
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        run_eval(EvalConfig(model="m", tasks=["passkey"], device="cuda"))


def test_run_eval_side_by_side(eval_run, stories_export, stories):
    cfg, result = eval_run
    from linearize.eval import evaluate_task, file_perplexity, passkey
    from linearize.models.cache import cache_bytes_per_sequence

    assert result["device"] == "cpu" and result["dtype"] == "float32"
    model, teacher = result["model"], result["teacher"]
    assert model["info"]["linearized"] and not teacher["info"]["linearized"]
    assert set(model["seconds"]) == set(cfg.selected_tasks)
    # the teacher side equals the single evaluations on the teacher loaded here
    net, tok = stories
    want = file_perplexity(net, tok, cfg.text, context=256, stride=128, max_tokens=3000)
    assert teacher["ppl"]["ppl"] == pytest.approx(want["ppl"], rel=1e-6) and teacher["ppl"]["tokens"] == 2999
    arc = evaluate_task(net, tok, cfg.mc_files[0], limit=8)
    assert {k: teacher["mc"]["arc_easy"][k] for k in ("acc", "acc_norm")} == {"acc": arc["acc"],
                                                                               "acc_norm": arc["acc_norm"]}
    pk = passkey(net, tok, contexts=[256, 512], depths=[0.0, 1.0], samples=2, seed=0, batch_size=8)
    for got, row in zip(teacher["passkey"]["grid"], pk["grid"], strict=True):
        assert got == {**row, "logprob": pytest.approx(row["logprob"], abs=1e-4)}
    assert [s["context"] for s in model["passkey"]["skipped"]] == [1024]
    assert [s["pairs"] for s in model["mqar"]["skipped"]] == [16]
    # cache bytes after 256 tokens: the teacher's K and V grow with the prompt, the linearized state does not
    assert teacher["info"]["state_bytes"] == {"tokens": 256, "bytes": 5 * 2 * 4 * 8 * 256 * 4}
    state, window = cache_bytes_per_sequence(linear_layers=5, num_state_heads=4, num_kv_heads=4, feature_dim=16,
                                             head_dim=8, window=16, dtype_bytes=4)
    assert model["info"]["state_bytes"]["bytes"] == state + window
    # the summary pairs both sides row by row
    rows = {r["metric"]: r for r in result["summary"]}
    assert rows["ppl wiki.valid.raw"]["teacher"] == teacher["ppl"]["ppl"]
    assert rows["ppl wiki.valid.raw"]["model"] == model["ppl"]["ppl"]
    assert rows["ppl wiki.valid.raw"]["better"] == "lower"
    assert rows["winogrande acc"]["model"] == model["mc"]["winogrande"]["acc"]
    assert {"passkey acc @256", "passkey acc @512", "mqar acc N=2", "mqar acc N=4", "state MiB/seq @256"} <= set(rows)
    assert "winogrande acc_norm" not in rows


def test_run_eval_writes_json_and_plots_and_renders(eval_run):
    cfg, result = eval_run
    from pathlib import Path

    written = json.loads(Path(cfg.json_out).read_text())
    assert written.pop("written_by").startswith("linearize ")  # the marker --overwrite looks for
    assert written == json.loads(json.dumps({k: v for k, v in result.items() if k != "plots"}))  # written first
    assert sorted(Path(p).name for p in result["plots"]) == ["distance.png", "mqar.png", "passkey.png"]
    table = render_table(result)
    assert [c.header for c in table.columns] == ["metric", "model", "teacher", "model / teacher or model - teacher",
                                                 "linear-off", "streaming"]
    assert table.row_count == len(result["summary"])
    ratio = list(table.columns[3].cells)
    ppl = next(i for i, r in enumerate(result["summary"]) if r["metric"].startswith("ppl "))
    row = result["summary"][ppl]
    assert ratio[ppl] == f"x{row['model'] / row['teacher']:.3f}"
    acc = next(i for i, r in enumerate(result["summary"]) if r["metric"] == "arc_easy acc")
    assert ratio[acc] == f"{result['summary'][acc]['model'] - result['summary'][acc]['teacher']:+.3f}"


def test_every_pass_of_every_task_shows_progress(stories, wiki_text, icl, tmp_path):
    """Perplexity, multiple choice, passkey (its prompts too: a tokenization per step of a binary search) and MQAR
    each report a task that counts up to its total."""
    from tests.conftest import STORIES, RecordingProgress

    text = tmp_path / "wiki.txt"
    text.write_text(wiki_text[:4000])
    progress = RecordingProgress()
    run_eval(EvalConfig(model=str(STORIES), text=str(text), context=256, stride=256, distance_tokens=600,
                        mc_files=[str(icl / "arc_easy.jsonl")], limit=4, passkey_contexts=[256], passkey_depths=[0.5],
                        passkey_samples=3, mqar_pairs=[2], mqar_samples=2), progress)
    tasks = {t["name"]: t for t in progress.tasks}
    assert set(tasks) == {"perplexity (context 256)", "perplexity by distance (context 512)", "arc_easy",
                          "building passkey prompts", "passkey", "mqar"}
    assert tasks["building passkey prompts"]["total"] == 3 and tasks["passkey"]["total"] == 3
    for name, task in tasks.items():
        assert task["total"] and task["done"] and task["done"][-1] == task["total"], (name, task)
