"""What the CLI prints and where: user and model text verbatim (never read as Rich markup), results on stdout,
progress and errors on stderr, --version, -h, an example in every verb's help. In-process (typer's CliRunner)."""

from __future__ import annotations

import io

import pytest
from typer.testing import CliRunner

import linearize.cli.main as cli
from linearize import __version__
from linearize.run.progress import BarProgress, LineProgress
from tests.conftest import linear_config

cli._register_setting_verbs()
runner = CliRunner()

# text Rich would eat or choke on as markup / emoji codes
MARKUP = "See note [1] and [eval] here; a [/] b [bold]c[/bold] [/INST] :smile: pip install 'linearize[data]'"


def invoke(*args):
    return runner.invoke(cli.app, [str(a) for a in args])


def _flat(text: str) -> str:
    return " ".join(text.split())


# -- verbatim printing ------------------------------------------------------------------------------------------
def test_fail_prints_the_message_verbatim(capsys):
    with pytest.raises(cli.typer.Exit) as e:
        cli._fail(f"reading x.parquet needs pyarrow: {MARKUP}")
    assert e.value.exit_code == 2
    out = capsys.readouterr()
    assert out.out == ""
    assert out.err == f"error: reading x.parquet needs pyarrow: {MARKUP}\n"


def test_say_and_warn_print_verbatim(capsys):
    cli._say(MARKUP)
    cli._warn(MARKUP)
    out = capsys.readouterr()
    assert out.out == MARKUP + "\n"
    assert out.err == f"warning: {MARKUP}\n"


def test_a_long_line_is_not_rewrapped(capsys):
    text = "word " * 60 + "[/]"
    cli._say(text)
    assert capsys.readouterr().out == text + "\n"


def test_interrupted_line_is_verbatim(capsys):
    from linearize.run.checkpoint import Interrupted

    with pytest.raises(cli.typer.Exit) as e:
        cli._interrupted(Interrupted(f"stopped at step 3 of {MARKUP}"))
    assert e.value.exit_code == 130
    assert capsys.readouterr().err == f"interrupted: stopped at step 3 of {MARKUP}. Rerun the same command to resume.\n"


def test_error_naming_a_user_path_keeps_its_brackets(tmp_path):
    folder = tmp_path / "runs [data] [bold]x"
    folder.mkdir()
    r = invoke("info", folder)
    assert r.exit_code == 2
    assert r.stderr == f"error: {folder} has no config.json; pass a folder written by `linearize convert`\n"


def test_main_error_path_is_verbatim(monkeypatch, capsys):
    # a flag's value is parsed outside the verb's own handler: main() prints that error
    monkeypatch.setattr("sys.argv", ["linearize", "convert", "model", "--softmax-layers", "[data],[/]"])
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --softmax-layers '[data],[/]': ") and err.count("\n") == 1, err


def test_progress_lines_are_verbatim():
    buf = io.StringIO()
    LineProgress(buf).log(MARKUP)
    assert buf.getvalue() == MARKUP + "\n"

    from rich.console import Console

    bar = BarProgress(Console(file=io.StringIO(), width=300, force_terminal=False))
    bar.log(MARKUP)
    with bar.task(f"reading {MARKUP}", total=2) as task:
        task.update(1, info="[/] loss 1.0")
    text = bar.console.file.getvalue()
    assert MARKUP + "\n" in text and f"reading {MARKUP}" in text and "[/] loss 1.0" in text


def test_bar_progress_default_console_is_stderr_and_verbatim(capsys):
    BarProgress().log(MARKUP)
    out = capsys.readouterr()
    assert out.out == "" and out.err == MARKUP + "\n"


# -- --version, -h, examples ---------------------------------------------------------------------------------
def test_version():
    r = invoke("--version")
    assert r.exit_code == 0 and r.stdout == f"linearize {__version__}\n"


@pytest.mark.parametrize("args", [[], ["generate"], ["bench"], ["bench", "sweep"], ["convert"]])
def test_dash_h_is_help(args):
    short, long = invoke(*args, "-h"), invoke(*args, "--help")
    assert short.exit_code == 0 and long.exit_code == 0, short.output
    assert "Usage:" in short.stdout and short.stdout == long.stdout


def _verbs():
    """Every leaf command, as its words after `linearize`."""
    from typer.main import get_command

    def walk(cmd, words):
        if hasattr(cmd, "commands"):  # a group
            return [v for name, sub in sorted(cmd.commands.items()) for v in walk(sub, [*words, name])]
        return [words]

    return walk(get_command(cli.app), [])


def test_every_verb_is_listed():
    names = {" ".join(v) for v in _verbs()}
    assert {"convert", "eval", "finetune", "validate", "info", "generate", "fetch", "bench kernels",
            "bench feature-maps", "bench generate", "bench sweep"} <= names


@pytest.mark.parametrize("verb", _verbs(), ids=" ".join)
def test_every_verb_help_has_an_example(verb):
    r = invoke(*verb, "-h")
    assert r.exit_code == 0, r.output
    assert f"Example: linearize {' '.join(verb)} " in _flat(r.stdout)


# -- stdout holds results, stderr progress ------------------------------------------------------------------
def test_convert_report_on_stdout_progress_on_stderr(stories_dir, tmp_path):
    r = invoke("convert", stories_dir, "--tokens", 0, "--seq-len", 64, "--out", tmp_path / "o")
    assert r.exit_code == 0, r.output
    assert "whole model on held-out calibration text" in r.stdout and f"Export: {tmp_path / 'o'}" in _flat(r.stdout)
    for progress in ("building calibration data", "sampling calibration text", "comparing the model", "exporting"):
        assert progress in r.stderr and progress not in r.stdout


def test_info_shows_the_trained_context(tmp_path):
    from linearize.convert.surgery import linearize_model
    from linearize.export.writer import save_linearized
    from tests.conftest import tiny_model

    save_linearized(linearize_model(tiny_model("llama"), linear_config(window=8)), tmp_path / "e")
    r = invoke("info", tmp_path / "e")
    assert r.exit_code == 0, r.output
    assert "trained context" in r.stdout and "256 tokens (the teacher's max_position_embeddings" in _flat(r.stdout)
