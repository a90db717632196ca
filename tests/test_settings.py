"""One place per setting: every field of the convert stage's settings is a CLI flag with the class's default and
docstring, a recipe and the CLI build the same settings, `linearize convert RECIPE.yaml` runs a recipe's stage 1;
attention settings are per layer and immutable; the cache protocol the attention module relies on is typed."""

from __future__ import annotations

import json

import pytest
import yaml

from linearize.convert.config import ConvertConfig
from linearize.errors import ConfigError
from linearize.io.sources import ModelSpec
from tests.conftest import run_cli, tiny_model


def _convert_command():
    import typer.main

    import linearize.cli.main as cli

    cli._register_setting_verbs()
    group = typer.main.get_command(cli.app)
    return group.commands["convert"]


def test_every_convert_setting_is_a_flag_with_the_class_default_and_doc():
    params = {p.name: p for p in _convert_command().params}
    fields = {**ConvertConfig.model_fields, **{k: v for k, v in ModelSpec.model_fields.items() if k != "source"}}
    assert set(fields) <= set(params), sorted(set(fields) - set(params))
    for name, info in fields.items():
        p = params[name]
        assert p.opts == ["--" + name.replace("_", "-")] and p.default is None  # "not given": the class decides
        default = info.get_default(call_default_factory=True)
        shown = ",".join(map(str, default)) or "none" if isinstance(default, list) else default
        assert f"(default: {shown})" in p.help and info.description.split()[0] in p.help, (name, p.help)


def test_recipe_and_cli_build_the_same_settings():
    from linearize.cli.main import _convert_job
    from linearize.finetune.pipeline import convert_job
    from linearize.recipes import validate_recipe

    r = validate_recipe({"model": "x/y", "output": "o", "convert": {"window": 16, "softmax_layers": [0, 2, 3]}}, [])
    job = _convert_job("x/y", None, None, False, [], {"window": 16, "softmax_layers": [3, 0, 2]})
    assert job.settings == convert_job(r).settings and job.settings.softmax_layers == [0, 2, 3]
    assert job.settings.seq_len == 1024 and job.settings.sinks == 4  # the defaults, resolved the same way
    with pytest.raises(ConfigError, match="window=-4 must be >= 0"):
        _convert_job("x/y", None, None, False, [], {"window": -4})
    with pytest.raises(ConfigError, match="--set applies to a recipe"):
        _convert_job("x/y", None, None, False, ["seed=1"], {})


def test_convert_a_recipe_with_flag_overrides(tiny_dir, tmp_path):
    recipe = {"model": str(tiny_dir), "output": str(tmp_path / "run"),
              "convert": {"data": str(tiny_dir.parent / "data.txt"), "tokens": 4 * 32, "seq_len": 32, "window": 8,
                          "batch_size": 2}}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    r = run_cli("convert", path, "--window", 4, "--softmax-layers", "1", "--set", "seed=3")
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "run" / "converted"
    lin = json.loads((out / "config.json").read_text())["linearize"]
    assert lin["window"] == 4 and lin["softmax_layers"] == [1] and lin["feature_map"] == "hedgehog"
    settings = json.loads((out / "transfer_report.json").read_text())["settings"]
    assert settings["seed"] == 3 and settings["tokens"] == 128 and settings["batch_size"] == 2


def test_attention_settings_are_per_layer_and_immutable():
    from pydantic import ValidationError

    from linearize.convert.surgery import linearize_model
    from linearize.modules.attention import LinearAttentionConfig, linear_attention_layers

    model = linearize_model(tiny_model("llama"), LinearAttentionConfig(window=8))
    first, second = linear_attention_layers(model)
    first.set_backend("torch")
    assert first.settings.backend == "torch" and second.settings.backend == "auto"
    assert model.linear_config.backend == "auto"  # the saved settings are not touched by a layer's choice
    with pytest.raises(ValidationError, match="frozen"):
        first.settings.window = 4


def test_the_recurrent_cache_implements_the_protocol_the_attention_module_uses():
    import ast
    import inspect

    import linearize.modules.attention as attention
    from linearize.models.cache import LinearizedCache, RecurrentStateLayer
    from linearize.modules.attention import RecurrentCacheLayer

    layer = LinearizedCache(window=4, num_layers=2, softmax_layers=[1]).layers[0]
    assert isinstance(layer, RecurrentStateLayer) and isinstance(layer, RecurrentCacheLayer)
    declared = {n for n, v in vars(RecurrentCacheLayer).items() if callable(v) and not n.startswith("_")}
    # every method the attention module calls on a cache layer is declared in the protocol...
    called = {node.func.attr for node in ast.walk(ast.parse(inspect.getsource(attention)))
              if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and isinstance(node.func.value, ast.Name) and node.func.value.id == "cache_layer"}
    assert called and called <= declared, sorted(called - declared)
    # ...and implemented by the cache
    assert [m for m in sorted(declared) if not callable(getattr(RecurrentStateLayer, m, None))] == []


def test_the_feature_map_doc_names_exactly_the_registry():
    """The one hand-written list of map names (it becomes the --feature-map help and the recipe reference)."""
    import re

    from linearize.modules.attention import LinearAttentionConfig
    from linearize.modules.feature_maps import FEATURE_MAPS

    doc = LinearAttentionConfig.model_fields["feature_map"].description
    listed = re.search(r":(.*)\(", doc).group(1)
    assert sorted(n.strip() for n in listed.split("|")) == sorted(FEATURE_MAPS)


def test_one_default_per_attention_setting():
    """LinearAttentionConfig holds the window and sinks defaults; convert's settings, its flags and the benchmarks'
    flags read them from there (they were 64/0 in the module, 256/4 in convert and 64 in bench generate)."""
    import inspect

    import typer.main

    import linearize.cli.main as cli
    from linearize.bench.generate import run_generate_bench
    from linearize.bench.sweep import run_generate_sweep
    from linearize.modules.config import DEFAULT_SINKS, DEFAULT_WINDOW, LinearAttentionConfig

    module, convert = LinearAttentionConfig(), ConvertConfig().attention()
    assert (module.window, module.sinks) == (convert.window, convert.sinks) == (DEFAULT_WINDOW, DEFAULT_SINKS)
    assert LinearAttentionConfig(window=0).sinks == 0  # sinks need a window
    flags = {p.name: p.help for p in _convert_command().params}  # "not given" = the class's default, shown
    assert f"(default: {DEFAULT_WINDOW})" in flags["window"] and "null = 4 with a window" in flags["sinks"]
    cli._register_setting_verbs()
    bench = typer.main.get_command(cli.app).commands["bench"].commands
    assert {p.name: p.default for p in bench["generate"].params}["window"] == DEFAULT_WINDOW
    for fn in (run_generate_bench, run_generate_sweep):
        assert inspect.signature(fn).parameters["window"].default == DEFAULT_WINDOW


def test_an_export_without_a_key_means_the_default_of_its_time():
    from linearize.modules.config import LinearAttentionConfig

    old = LinearAttentionConfig.from_dict({"feature_map": "hedgehog"})  # written before window / sinks were recorded
    assert (old.window, old.sinks) == (64, 0)
    assert LinearAttentionConfig.from_dict({"window": 128}).sinks == 0
    assert LinearAttentionConfig.from_dict(LinearAttentionConfig().to_dict()) == LinearAttentionConfig()
