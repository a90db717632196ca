"""The CLI as a user meets it: help, one-line errors with exit status 2, info on an export."""

from __future__ import annotations

from linearize.convert.surgery import linearize_model
from linearize.export.writer import save_linearized
from tests.conftest import linear_config, one_error_line, run_cli, tiny_model


def test_help_lists_verbs():
    r = run_cli("--help")
    assert r.returncode == 0
    for verb in ("convert", "info", "generate", "eval", "fetch", "bench"):
        assert verb in r.stdout


def test_convert_bad_model_path(tmp_path):
    line = one_error_line(run_cli("convert", tmp_path / "missing-model", "--out", tmp_path / "o"))
    assert "missing-model" in line


def test_convert_bad_data_path(tiny_dir, tmp_path):
    line = one_error_line(run_cli("convert", tiny_dir, "--data", tmp_path / "nope.txt", "--out", tmp_path / "o"))
    assert "nope.txt" in line


def test_convert_empty_data(tiny_dir, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    one_error_line(run_cli("convert", tiny_dir, "--data", tmp_path / "empty.txt", "--out", tmp_path / "o"))
    assert not (tmp_path / "o").exists()


def test_convert_seq_len_beyond_context(tiny_dir, tmp_path):
    line = one_error_line(run_cli("convert", tiny_dir, "--data", tiny_dir.parent / "data.txt", "--seq-len", 4096,
                                   "--out", tmp_path / "o"))
    assert "4096" in line and "256" in line


def test_convert_bad_feature_map(tiny_dir, tmp_path):
    line = one_error_line(run_cli("convert", tiny_dir, "--feature-map", "cosine", "--out", tmp_path / "o"))
    assert "hedgehog" in line


def test_convert_untrained_then_info(tiny_dir, tmp_path):
    r = run_cli("convert", tiny_dir, "--data", tiny_dir.parent / "data.txt", "--tokens", 0, "--seq-len", 32,
                "--out", tmp_path / "o", "--window", 0)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "o" / "model.safetensors").is_file()
    info = run_cli("info", tmp_path / "o")
    assert info.returncode == 0, info.stderr
    assert "pure linear" in info.stdout and "2 linear, 0 softmax" in info.stdout


def test_info_numbers(tmp_path):
    model = linearize_model(tiny_model("llama"), linear_config(window=8, softmax_layers=[1]))
    save_linearized(model, tmp_path / "e")
    r = run_cli("info", tmp_path / "e")
    assert r.returncode == 0, r.stderr
    # 1 linear layer x 2 kv heads x (32*16 + 32) fp32 = 4352 B state; window 2 x 2 x 7 x 16 x 4 B = 1792 B (fp32 model)
    assert "4,352 B" in r.stdout or "4.2 KiB" in r.stdout
    assert "1 linear, 1 softmax" in r.stdout


def test_info_on_non_linearized_folder(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path / "plain")
    line = one_error_line(run_cli("info", tmp_path / "plain"))
    assert "not a linearized model" in line


def test_bench_needs_a_gpu_or_valid_lists():
    import torch

    if not torch.cuda.is_available():
        for verb in ("kernels", "feature-maps", "generate", "sweep"):
            line = one_error_line(run_cli("bench", verb))
            assert "CUDA GPU" in line
    line = one_error_line(run_cli("bench", "generate", "--device", "cpu", "--compile-decode", "--batch", "2,x"))
    assert "--batch" in line
    for bad, says in ((["--lengths", "0"], "--lengths"), (["--memory-limit", "lots"], "--memory-limit 'lots'"),
                      (["--models", "teacher,fast"], "unknown sweep models")):
        assert says in one_error_line(run_cli("bench", "sweep", "--device", "cpu", *bad))


def test_bool_settings_take_a_no_flag():
    """A bool setting is `--name` (True) or `--no-name` (False): how a null default (auto_window_only) or a
    recipe's choice is undone from the command line; the verb receives exactly what was given."""
    import typer
    from typer.testing import CliRunner

    from linearize.cli.options import settings_flags
    from linearize.convert.config import ConvertConfig

    app, seen = typer.Typer(), []

    @app.command()
    @settings_flags(ConvertConfig, exclude={"data"})
    def convert(*, overrides: dict) -> None:
        seen.append(overrides)

    runner = CliRunner()
    for args, want in ((["--no-auto-window-only"], {"auto_window_only": False}),
                       (["--auto-window-only"], {"auto_window_only": True}), ([], {})):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        assert seen.pop() == want
    assert not ConvertConfig.build(**{"auto_window_only": False}).window_only_on
