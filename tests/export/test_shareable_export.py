"""Exports people can share (real stories260K, a local teacher): a model card that huggingface_hub parses, with the
conversion settings and the reports' numbers, written by `convert`, by `finetune` and for a delta export; no file
names a path of this machine (teacher, data, output, working directory, home, this checkout); normal file modes;
what `model.push_to_hub` and `huggingface_hub.upload_folder` upload, captured at `HfApi.create_commit` (the hub
itself cannot be reached here: `create_repo`, `create_commit`, the card look-up and the hub's README check are the
only calls replaced, and upload_folder takes its one-commit path)."""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path

import pytest
import torch
import yaml

from linearize import __version__
from linearize.convert.config import ConvertConfig
from linearize.convert.pipeline import ConvertJob, convert
from tests.conftest import REPO, SHARED, STORIES, linear_config, tiny_model

WIKI = SHARED / "wikitext-raw" / "wiki.valid.raw"


def _convert(out: Path, **settings) -> Path:
    cfg = ConvertConfig.build(**{"window": 16, "tokens": 4 * 64, "seq_len": 64, "val_tokens": 4 * 64,
                                 "batch_size": 4, "checkpoint_every": 0, **settings})
    return convert(ConvertJob(model=str(STORIES), out=out, settings=cfg), log=lambda m: None)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A `convert` export of stories260K (teacher-sampled calibration text) and a delta export."""
    if not (STORIES / "config.json").is_file():
        pytest.skip(f"real stories260K model not found at {STORIES} (set LINEARIZE_SHARED to the shared/ folder)")
    tmp = tmp_path_factory.mktemp("convert")
    return _convert(tmp / "stories-linear"), _convert(tmp / "stories-delta", export="delta")


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """`finetune` of stories260K from the softmax teacher (conversion included), real text, `eval.text`, with the
    adapter kept apart (--no-merge): the smallest run of tests/finetune's recipes, on the real model."""
    if not (STORIES / "config.json").is_file() or not WIKI.is_file():
        pytest.skip(f"real stories260K / WikiText not found under {SHARED} (set LINEARIZE_SHARED)")
    from linearize.finetune.pipeline import run_recipe
    from linearize.recipes import load_recipe

    tmp = tmp_path_factory.mktemp("finetune")
    text = WIKI.read_text()
    (tmp / "train.txt").write_text(text[:60_000])
    (tmp / "heldout.txt").write_text(text[-20_000:])
    recipe = {
        "model": {"source": str(STORIES), "dtype": "float32", "device": "cpu"},
        "convert": {"window": 16, "tokens": 4 * 64, "seq_len": 64, "batch_size": 4, "val_tokens": 4 * 64,
                    "checkpoint_every": 0},
        "finetune": {"data": str(tmp / "train.txt"), "tokens": 8 * 64 * 2, "seq_len": 64, "batch_size": 8,
                     "val_tokens": 4 * 64, "checkpoint_every": 0, "eval_batch_size": 8, "lora": {"rank": 4}},
        "eval": {"text": str(tmp / "heldout.txt"), "seq_len": 64, "max_tokens": 256},
        "output": str(tmp / "run"),
    }
    (tmp / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    recipe = load_recipe(tmp / "recipe.yaml")
    return run_recipe(recipe, no_merge=True, log=lambda m: None), recipe


# -- helpers ---------------------------------------------------------------------------------------------------
def _local_paths() -> list[str]:
    """Paths of this machine that no shared file may name."""
    paths = {str(STORIES.resolve()), str(SHARED.resolve()), str(REPO), os.getcwd(), os.path.realpath("/tmp")}
    if Path.home() != Path("/"):
        paths.add(str(Path.home()))
    return sorted(paths, key=len, reverse=True)


def _assert_no_local_path(files: dict[str, bytes], tmp_root: Path, *, allow: tuple[str, ...] = ()) -> None:
    needles = [*_local_paths(), str(tmp_root.resolve())]
    for name, data in files.items():
        text = _text_of(name, data)
        for allowed in allow:
            text = text.replace(allowed, "")
        for needle in needles:
            assert needle not in text, f"{name} names the local path {needle}"
        assert not re.search(r"(?<![\w./~-])/(?:tmp|work|home|root|usr|opt|var|mnt|data)/", text), name


def _folder_files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _text_of(name: str, data: bytes) -> str:
    """A file's text; for safetensors its header (names and metadata), not the weights' bytes."""
    if name.endswith(".safetensors"):
        data = data[8 : 8 + int.from_bytes(data[:8], "little")]
    return data.decode("utf-8", errors="replace")


def _card(folder: Path):
    from huggingface_hub import ModelCard

    return ModelCard.load(folder / "README.md")


def _table(card_text: str, heading: str) -> dict[str, list[float]]:
    """The rows (label -> numbers) of the first markdown table after ``heading`` in the card."""
    rest = card_text[card_text.index(heading):]
    rows = {}
    for line in rest.splitlines():
        if line.startswith("| ") and not line.startswith(("| model", "| ---")):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = [float(c) for c in cells[1:]]
        elif rows and not line.startswith("|"):
            break
    return rows


def _assert_equal_rounded(shown: list[float], values: list[float]) -> None:
    assert shown == pytest.approx(values, rel=6e-4), (shown, values)  # the card shows 4 significant digits


def _modes_normal(folder: Path) -> None:
    mask = os.umask(0)
    os.umask(mask)
    for p in (folder, *folder.rglob("*")):
        want = (0o777 if p.is_dir() else 0o666) & ~mask
        assert stat.S_IMODE(p.stat().st_mode) == want, f"{p.relative_to(folder)}: {oct(p.stat().st_mode)}"


# -- convert -----------------------------------------------------------------------------------------------------
def test_convert_writes_a_card_with_the_reports_numbers(converted):
    out, _ = converted
    card = _card(out)
    report = json.loads((out / "transfer_report.json").read_text())
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert {"linearize", "linear-attention", "hedgehog"} <= set(card.data.tags)
    assert card.data.base_model is None  # a local teacher has no hub id
    assert "the local model `stories260K-hf`" in card.text
    rows = _table(card.text, "### Attention transfer")
    for label, key in (("before transfer (untrained feature maps)", "untrained"),
                       ("after transfer (this export)", "trained")):
        m = report[key]
        _assert_equal_rounded(rows[label], [m["kl"], m["ppl_teacher"], m["ppl_student"], m["ppl_ratio"]])
    assert "text the teacher sampled itself, not real text" in card.text  # which text the numbers are on
    assert f"{report['calibration']['valid_sequences']} held-out sequences of 64 tokens" in card.text
    assert "| window | 16 tokens |" in card.text and "| sinks | 4 |" in card.text
    assert f"| transfer tokens | {report['tokens']:,} ({report['steps']} steps) |" in card.text
    assert f"pip install linearize=={__version__}" in card.text and "trust_remote_code=True" in card.text
    assert 'path = "stories-linear"' in card.text


def test_convert_export_names_no_local_path_and_has_normal_modes(converted, tmp_path):
    out, _ = converted
    _assert_no_local_path(_folder_files(out), out.parent)
    lin = json.loads((out / "config.json").read_text())["linearize"]
    assert lin["teacher"] == "local:stories260K-hf"
    report = json.loads((out / "transfer_report.json").read_text())
    assert report["teacher"] == report["settings"]["model"] == "local:stories260K-hf"
    shim = (out / "modeling_linearize.py").read_text()
    assert f"install it with: pip install linearize=={__version__}" in shim
    _modes_normal(out)  # model.safetensors was 0600


def test_card_names_a_hub_teacher_as_base_model(tmp_path):
    from linearize.convert.surgery import linearize_model
    from linearize.export.card import model_card
    from linearize.export.writer import save_linearized

    model = linearize_model(tiny_model("llama"), linear_config(window=0, feature_map="based"),
                            teacher="HuggingFaceTB/SmolLM2-135M")
    out = save_linearized(model, tmp_path / "e")
    card = _card(out)
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M"
    assert "based" in card.data.tags and "sliding-window-attention" not in card.data.tags
    assert "[`HuggingFaceTB/SmolLM2-135M`](https://huggingface.co/HuggingFaceTB/SmolLM2-135M)" in card.text
    assert "## Measured" not in card.text  # no report, no numbers
    assert (out / "README.md").read_text() == model_card(out)  # the card is a function of the folder


def test_delta_export_card_says_where_its_base_must_be(converted):
    _, delta = converted
    card = _card(delta)
    assert "This is a delta export" in card.text and "--export full" in card.text
    lin = json.loads((delta / "config.json").read_text())["linearize"]
    # the one local path an export keeps: without it the delta cannot load (documented in the card)
    assert lin["delta_base"] == str(STORIES.resolve()) and lin["teacher"] == "local:stories260K-hf"
    _assert_no_local_path(_folder_files(delta), delta.parent, allow=(lin["delta_base"],))
    _modes_normal(delta)


# -- what is uploaded ---------------------------------------------------------------------------------------------
@pytest.fixture
def hub(monkeypatch):
    """The hub's side of an upload, on this machine: every file of the commit is read at `create_commit`."""
    from huggingface_hub import HfApi, ModelCard, RepoUrl
    from huggingface_hub.errors import EntryNotFoundError
    from huggingface_hub.hf_api import CommitInfo

    commits: list[dict[str, bytes]] = []

    def create_repo(self, repo_id, **kwargs):
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_commit(self, repo_id, operations, **kwargs):
        commits.append({op.path_in_repo: Path(op.path_or_fileobj).read_bytes() for op in operations})
        return CommitInfo(commit_url=f"https://huggingface.co/{repo_id}/commit/{'0' * 40}", commit_message="",
                          commit_description="", oid="0" * 40)

    def no_card_yet(cls, repo_id_or_path, **kwargs):  # a new repository has no README.md
        raise EntryNotFoundError(f"{repo_id_or_path} has no README.md")

    def validate_yaml(self, content, **kwargs):  # the hub's metadata check, here: the card parses
        ModelCard(content)

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    monkeypatch.setattr(ModelCard, "load", classmethod(no_card_yet))
    monkeypatch.setattr(HfApi, "_validate_yaml", validate_yaml)
    monkeypatch.setattr("huggingface_hub.hf_api.is_xet_available", lambda: False)  # upload_folder: one commit
    return commits


def test_push_to_hub_uploads_no_local_path(converted, hub):
    from transformers import AutoModelForCausalLM

    import linearize  # noqa: F401

    out, delta = converted
    for folder in (out, delta):  # a model loaded from a delta export pushes whole, without its base's path
        AutoModelForCausalLM.from_pretrained(folder).push_to_hub(f"someone/{folder.name}")
    for files, folder in zip(hub, (out, delta)):
        assert {"config.json", "model.safetensors", "modeling_linearize.py", "README.md"} <= set(files), folder
        _assert_no_local_path(files, folder.parent)
        lin = json.loads(files["config.json"])["linearize"]
        assert lin["teacher"] == "local:stories260K-hf" and "delta_base" not in lin


def test_upload_folder_uploads_the_card_and_no_local_path(converted, hub):
    from huggingface_hub import HfApi, ModelCard

    out, _ = converted
    HfApi().upload_folder(folder_path=str(out), repo_id="someone/stories-linear")
    files = hub[0]
    assert set(files) == set(_folder_files(out))
    assert files["README.md"] == (out / "README.md").read_bytes()
    assert "linearize" in ModelCard(files["README.md"].decode()).data.tags
    _assert_no_local_path(files, out.parent)


# -- finetune ----------------------------------------------------------------------------------------------------
def test_finetune_writes_a_card_with_the_reports_numbers(finetuned):
    out, _ = finetuned
    card = _card(out)
    report = json.loads((out / "finetune_report.json").read_text())
    transfer = json.loads((out / "transfer_report.json").read_text())
    assert card.data.library_name == "transformers" and card.data.base_model is None
    assert {"linearize", "linear-attention", "lora"} <= set(card.data.tags)
    teacher_ppl = report["teacher_metrics"]["valid"]["ppl"]
    for key, heading in (("valid", "### LoRA finetuning"), ("text", "heldout.txt")):
        rows = _table(card.text, heading)
        for label, metrics in (("teacher (softmax attention)", report["teacher_metrics"]),
                               ("after transfer, before finetuning", report["before"]),
                               ("after finetuning (this export with its adapter)", report["after"])):
            m, ref = metrics[key], report["teacher_metrics"][key]["ppl"]
            _assert_equal_rounded(rows[label], [m["loss"], m["ppl"], m["ppl"] / ref])
    assert teacher_ppl > 0
    assert "real text (local:train.txt" in card.text and "the text file `heldout.txt`" in card.text
    rows = _table(card.text, "### Attention transfer")
    _assert_equal_rounded(rows["after transfer"], [transfer["trained"][k] for k in
                                                   ("kl", "ppl_teacher", "ppl_student", "ppl_ratio")])
    assert f"| finetune tokens | {report['tokens']:,} ({report['steps']} steps) |" in card.text
    assert "| LoRA targets | q_proj, k_proj, v_proj, o_proj |" in card.text
    assert 'subfolder="adapter"' in card.text


def test_finetune_export_names_no_local_path(finetuned):
    out, recipe = finetuned
    files = _folder_files(out)
    assert "adapter/adapter_config.json" in files and "adapter/README.md" in files
    _assert_no_local_path(files, out.parent.parent)
    assert json.loads(files["adapter/adapter_config.json"])["base_model_name_or_path"] == "."
    report = json.loads(files["finetune_report.json"])
    assert report["base"] == "local:converted" and report["teacher"] == "local:stories260K-hf"
    assert report["recipe"]["eval"]["text"] == "local:heldout.txt"
    _modes_normal(out)


def test_finetune_rerun_still_reuses_its_conversion(finetuned):
    """The converted export's report names no path, yet a rerun of the recipe finds it is the same conversion (the
    settings' digest)."""
    from linearize.finetune.pipeline import ensure_converted
    from linearize.run.progress import QuietProgress

    _, recipe = finetuned
    logs = []
    assert ensure_converted(recipe, progress=QuietProgress(logs.append)) == recipe.converted_dir
    assert logs == [f"using the converted model in {recipe.converted_dir}"]


def test_finetuned_adapter_loads_after_the_folder_moves(finetuned, tmp_path):
    """adapter_config.json names its base "." (no path): inside the export `AutoPeftModelForCausalLM` finds it
    wherever the folder went, and `PeftModel.from_pretrained(..., subfolder="adapter")` works from anywhere."""
    import shutil

    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM

    import linearize  # noqa: F401

    out, _ = finetuned
    ids = torch.randint(3, 500, (1, 24))
    with torch.no_grad():
        ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out), out, subfolder="adapter")
        ref_logits = ref.eval()(input_ids=ids).logits
    moved = tmp_path / "elsewhere" / "shared-model"
    moved.parent.mkdir()
    cwd = os.getcwd()
    shutil.move(out, moved)  # the original is gone while the moved folder loads (moved back for the other tests)
    try:
        os.chdir(moved)
        auto = AutoPeftModelForCausalLM.from_pretrained("adapter").eval()
        os.chdir(tmp_path)
        anywhere = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(moved), moved, subfolder="adapter")
    finally:
        os.chdir(cwd)
        shutil.move(moved, out)
    with torch.no_grad():
        assert torch.equal(auto(input_ids=ids).logits, ref_logits)
        assert torch.equal(anywhere.eval()(input_ids=ids).logits, ref_logits)
