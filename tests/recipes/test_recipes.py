"""Recipes: every file under recipes/ validates through the real command; errors are one readable line naming the
key path; overrides; the reference in docs/recipes.md is generated from the schema and current."""

from __future__ import annotations

import json

import pytest
import yaml

from linearize.cli.recipe_commands import finetune_command, validate_command
from linearize.errors import ConfigError, LinearizeError
from linearize.recipes import load_recipe, reference_markdown, validate_recipe
from tests.conftest import REPO

RECIPES = sorted((REPO / "recipes").rglob("*.yaml"))
MINIMAL = {"model": "some/model", "output": "runs/x"}


def test_recipes_found():
    # walk recursively: every recipes/<model>/<stage>.yaml, not just the top folder
    names = {p.relative_to(REPO / "recipes").as_posix() for p in RECIPES}
    for expected in ("stories260k/finetune.yaml", "smollm2-135m/finetune.yaml", "gpt2/finetune.yaml",
                     "llama-2-7b/finetune.yaml", "llama-3-8b/finetune.yaml", "mistral-7b/finetune.yaml",
                     "qwen2.5-7b/finetune.yaml"):
        assert expected in names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.relative_to(REPO / "recipes").as_posix())
def test_every_recipe_validates_and_dry_runs(path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)  # recipes' relative paths start at the repository root
    # The shipped recipes name models that `linearize fetch` downloads and data in ../shared, absent on a fresh
    # checkout; `validate` checks those paths too (tests/cli/test_bad_input.py), so the path check is recorded here.
    checked = []
    monkeypatch.setattr("linearize.cli.recipe_commands.check_recipe_paths", lambda r: checked.append(r.output))
    validate_command(path, [])
    assert checked
    assert "valid" in capsys.readouterr().out
    # the real command, with the work mocked out: a dry run loads nothing
    out = finetune_command(path, [], no_merge=False, dry_run=True)
    recipe = load_recipe(path)
    assert out == recipe.finetuned_dir
    assert "plan:" in capsys.readouterr().out


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.relative_to(REPO / "recipes").as_posix())
def test_every_recipe_has_a_header(path):
    head = path.read_text().split("\n\n")[0]
    for word in ("Launch:", "Override:", "Hardware:", "Expected:"):
        assert word in head, f"{path}: header lacks {word!r}"
    assert "linearize finetune " + path.relative_to(REPO).as_posix() in head


def _error(raw, overrides=()) -> str:
    with pytest.raises(ConfigError) as e:
        validate_recipe(raw, list(overrides))
    msg = str(e.value)
    assert "\n" not in msg and "pydantic" not in msg and "errors.pydantic.dev" not in msg
    return msg


def test_unknown_key_names_path_and_valid_keys():
    msg = _error({**MINIMAL, "finetune": {"lora": {"rnak": 4}}})
    assert "unknown key `finetune.lora.rnak`" in msg
    assert "did you mean `finetune.lora.rank`" in msg
    assert "valid keys in `finetune.lora`: rank, alpha, dropout, target_modules" in msg


def test_unknown_top_level_section():
    msg = _error({**MINIMAL, "finetuning": {}})
    assert "unknown key `finetuning`" in msg and "did you mean `finetune`" in msg and "the top level" in msg


def test_wrong_type_and_range_and_missing_all_in_one_error():
    msg = _error({"model": {"source": "x", "dtype": "float64"},
                  "finetune": {"lr": "fast", "batch_size": 0, "kd": {"weight": 1.5}}})
    for part in ("`finetune.lr`", "'fast'", "`finetune.batch_size`", "`finetune.kd.weight`", "`model.dtype`",
                 "missing required key `output`"):
        assert part in msg, (part, msg)


def test_library_config_checks_are_reported_by_key_path():
    msg = _error({**MINIMAL, "convert": {"feature_map": "nope", "window": -1, "lr": 0}})
    assert "convert.feature_map='nope' is not one of" in msg
    assert "convert.window=-1" in msg and "convert.lr=0" in msg


def test_cross_field_checks():
    msg = _error({**MINIMAL, "finetune": {"tokens": 100, "seq_len": 64, "batch_size": 8, "micro_batch_size": 3}})
    assert "less than one step" in msg and "micro_batch_size=3 must divide" in msg


def test_overrides_parse_yaml_values_and_create_sections():
    r = validate_recipe(MINIMAL, ["finetune.lr=2e-4", "finetune.kd.weight=0.25", "convert.softmax_layers=[0, 3]",
                                  "finetune.lora.target_modules=[q_proj, v_proj]", "finetune.data=null",
                                  "seed=7"])
    assert r.finetune.lr == 2e-4 and r.finetune.kd.weight == 0.25 and r.convert.softmax_layers == [0, 3]
    assert r.finetune.lora.target_modules == ["q_proj", "v_proj"] and r.seed == 7 and r.finetune.data is None
    assert validate_recipe(MINIMAL, ["model=other/model"]).model.source == "other/model"


@pytest.mark.parametrize("override,expect", [
    ("finetune.lr", "expected KEY.PATH=VALUE"),
    ("=3", "expected KEY.PATH=VALUE"),
    ("finetune..lr=3", "expected KEY.PATH=VALUE"),
    ("seed=[1,", "not valid YAML"),
    ("model.source.x=1", "`model.source` is a value"),
    ("finetune.lora.rnak=4", "unknown key `finetune.lora.rnak`"),
    ("finetune.lora.rank=many", "`finetune.lora.rank`"),
])
def test_bad_override(override, expect):
    assert expect in _error({"model": {"source": "x"}, "output": "o"}, [override])


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        validate_command(tmp_path / "missing.yaml", [])
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML.*line"):
        validate_command(bad, [])
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        validate_command(bad, [])
    assert issubclass(ConfigError, LinearizeError) and issubclass(ConfigError, ValueError)


def _strings(node, key=""):
    """Every string value of a parsed recipe with its key path (lists included: data mixtures)."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _strings(v, f"{key}.{k}" if key else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _strings(v, f"{key}[{i}]")
    elif isinstance(node, str):
        yield key, node


def test_recipes_use_only_relative_or_hub_paths():
    """No user-specific absolute folders in shipped recipes, under any key (output, model.source, convert.data,
    finetune.data, eval.text, and whatever key comes next)."""
    for path in RECIPES:
        strings = dict(_strings(yaml.safe_load(path.read_text())))
        assert "output" in strings and "model.source" in strings, path
        absolute = {k: v for k, v in strings.items() if v.startswith(("/", "~"))}
        assert absolute == {}, path


def test_the_path_check_sees_every_path_key():
    planted = {"output": "runs/x", "model": {"source": "org/model"}, "convert": {"data": ["a", "/home/me/b"]},
               "finetune": {"data": "~/c"}, "eval": {"text": "/data/wiki.txt"}}
    assert {k for k, v in _strings(planted) if v.startswith(("/", "~"))} == {
        "convert.data[1]", "finetune.data", "eval.text"}


def test_reference_doc_is_current():
    doc = (REPO / "docs" / "recipes.md").read_text()
    assert reference_markdown().strip() in doc, "regenerate: python -m linearize.recipes > section of docs/recipes.md"


def test_convert_data_is_checked_only_when_stage_1_runs(tmp_path):
    """A recipe that starts from a linearized export skips stage 1, so its (unused) convert.data need not exist;
    from a softmax checkpoint the same missing path is an error naming the key."""
    from linearize.recipes import Recipe, check_recipe_paths

    export = tmp_path / "export"
    export.mkdir()
    (export / "config.json").write_text(json.dumps({"model_type": "linearized_llama", "linearize": {"window": 8}}))
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    (teacher / "config.json").write_text(json.dumps({"model_type": "llama"}))
    missing = str(tmp_path / "no-such-data")
    for source, fails in ((export, False), (teacher, True)):
        recipe = Recipe.model_validate({"model": {"source": str(source)}, "convert": {"data": missing},
                                        "finetune": {"data": str(tmp_path)}, "output": str(tmp_path / "run")})
        if fails:
            with pytest.raises(ConfigError, match="convert.data: .*no-such-data does not exist"):
                check_recipe_paths(recipe)
        else:
            check_recipe_paths(recipe)
