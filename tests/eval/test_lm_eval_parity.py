"""Our multiple-choice scores equal lm-evaluation-harness's on the same items: its ``hf`` model runs tasks defined
here from local files (``dataset_path: json``), 20 items each of the shipped ARC-Easy, PIQA and Winogrande, on the
real stories260K teacher and on a linearized export of it. Per item, the option log-likelihoods agree to 1e-4 and
acc / acc_norm are identical.

The task YAMLs encode our join rule (see linearize.eval.multiple_choice): ARC's queries end in a letter or "?", so
lm-eval's default ``target_delimiter: " "`` applies; every PIQA query ends in "\\n", so no delimiter
(``target_delimiter: ""``); Winogrande is lm-eval's partial scoring (``doc_to_text`` the gold index, the options as
contexts, the one continuation as target). Our ``acc_norm`` divides by UTF-8 bytes, lm-eval's ``acc_bytes`` too;
its ``acc_norm`` divides by characters, the same on these ASCII items.

Two ways an export runs under lm-eval are checked: in this process after ``import linearize`` (the linearized
classes are registered, ``pretrained=DIR`` is enough), and, in the slow test, the ``lm_eval`` command line with
``trust_remote_code=True`` in a fresh process that never imports linearize itself (the export's
``modeling_linearize.py`` shim does).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from linearize.eval.multiple_choice import evaluate_task
from linearize.io.loading import load_model

lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install lm_eval)")

ITEMS = 20
# task name -> (shipped file, lm-eval task YAML body after dataset_kwargs)
TASKS = {
    "lin_arc_easy": ("arc_easy", 'doc_to_text: query\ndoc_to_choice: choices\ndoc_to_target: gold\n'
                                 'target_delimiter: " "\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n'
                                 '  - metric: acc_bytes\n'),
    "lin_piqa": ("piqa", 'doc_to_text: query\ndoc_to_choice: choices\ndoc_to_target: gold\n'
                         'target_delimiter: ""\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n'
                         '  - metric: acc_bytes\n'),
    "lin_winogrande": ("winogrande", 'doc_to_text: "{{gold}}"\ndoc_to_choice: "{{context_options}}"\n'
                                     'doc_to_target: continuation\ntarget_delimiter: " "\n'
                                     'metric_list:\n  - metric: acc\n'),
}


@pytest.fixture(scope="module")
def task_dir(icl, tmp_path_factory):
    """lm-eval task YAMLs over the first ITEMS records of each shipped file (copied next to them)."""
    root = tmp_path_factory.mktemp("lm_eval_tasks")
    for task, (stem, body) in TASKS.items():
        lines = (icl / f"{stem}.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)[:ITEMS]
        data = root / f"{stem}.jsonl"
        data.write_text("".join(lines), encoding="utf-8")
        (root / f"{task}.yaml").write_text(
            f"task: {task}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
            f"test_split: test\noutput_type: multiple_choice\n{body}")
    return root


def _theirs(pretrained: str, tasks: list[str], task_dir) -> dict:
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={pretrained},dtype=float32", tasks=tasks,
                                   task_manager=TaskManager(include_path=str(task_dir)), device="cpu",
                                   batch_size=8, log_samples=True)


def _assert_same(ours: dict, theirs: dict, task: str) -> None:
    samples = sorted(theirs["samples"][task], key=lambda s: s["doc_id"])
    assert len(samples) == ours["items"] == ITEMS
    for item, sample in zip(ours["per_item"], samples):
        assert item["logprobs"] == pytest.approx([ll for ll, _ in sample["filtered_resps"]], abs=1e-4)
        assert float(item["pred"] == item["gold"]) == sample["acc"]
        if "pred_norm" in item:
            assert float(item["pred_norm"] == item["gold"]) == sample["acc_bytes"] == sample["acc_norm"]
    agg = theirs["results"][task]
    assert ours["acc"] == agg["acc,none"]
    if "acc_norm" in ours:
        assert ours["acc_norm"] == agg["acc_bytes,none"] == agg["acc_norm,none"]


def _ours(path, task_dir, stem):
    model, tok = load_model(path, attn_implementation="sdpa")
    return evaluate_task(model, tok, task_dir / f"{stem}.jsonl", batch_size=8, per_item=True)


def test_teacher_matches_lm_eval(stories_dir, task_dir):
    theirs = _theirs(str(stories_dir), list(TASKS), task_dir)
    for task, (stem, _) in TASKS.items():
        _assert_same(_ours(stories_dir, task_dir, stem), theirs, task)


def test_export_matches_lm_eval_after_import_linearize(stories_export, task_dir):
    import linearize  # noqa: F401  (registers linearized_llama: no trust_remote_code needed)

    tasks = ["lin_arc_easy", "lin_winogrande"]
    theirs = _theirs(str(stories_export), tasks, task_dir)
    for task in tasks:
        _assert_same(_ours(stories_export, task_dir, TASKS[task][0]), theirs, task)


def test_export_under_the_lm_eval_cli_with_remote_code(stories_export, task_dir, tmp_path):
    cli = shutil.which("lm_eval", path=str(Path(sys.executable).parent))
    if cli is None:
        pytest.skip("the lm_eval command is not installed next to this Python")
    out = tmp_path / "out"
    cmd = [cli, "--model", "hf", "--model_args", f"pretrained={stories_export},trust_remote_code=True,dtype=float32",
           "--tasks", "lin_arc_easy,lin_winogrande", "--include_path", str(task_dir), "--device", "cpu",
           "--batch_size", "8", "--output_path", str(out), "--log_samples"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads(next(out.rglob("results_*.json")).read_text())["results"]
    for task in ("lin_arc_easy", "lin_winogrande"):
        ours = _ours(stories_export, task_dir, TASKS[task][0])
        rows = [json.loads(line) for line in next(out.rglob(f"samples_{task}_*.jsonl")).read_text().splitlines()]
        rows.sort(key=lambda s: s["doc_id"])
        # per-option log-likelihoods of the linearized model (a plain Llama load of the weights would differ)
        for item, row in zip(ours["per_item"], rows, strict=True):
            assert item["logprobs"] == pytest.approx([float(ll) for ll, _ in row["filtered_resps"]], abs=1e-4)
        assert results[task]["acc,none"] == ours["acc"]
        if "acc_norm" in ours:
            assert results[task]["acc_bytes,none"] == ours["acc_norm"]
