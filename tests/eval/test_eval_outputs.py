"""``linearize eval``'s outputs are checked before any model loads (a folder where --json-out names a file, a file
linearize did not write, a linearize result without --overwrite, --plot without matplotlib) and written results
first, plots after. In-process (typer's runner) on the real stories260K model, with tiny task sizes."""

from __future__ import annotations

import json
import time

import pytest
from typer.testing import CliRunner

import linearize.cli.main as cli
from linearize.errors import LinearizeError
from linearize.eval import EvalConfig, run_eval
from linearize.export.writer import marked_json, write_output_file
from tests.conftest import USER_JSON, hide_matplotlib

cli._register_setting_verbs()
FAST = ("--tasks", "mqar", "--mqar-pairs", "2", "--mqar-samples", "1")


def _eval(*args):
    """``(exit code, stderr lines, seconds)`` of ``linearize eval ARGS`` in-process."""
    t0 = time.perf_counter()
    r = CliRunner().invoke(cli.app, ["eval", *map(str, args)])
    return r.exit_code, [ln for ln in r.stderr.splitlines() if ln.strip()], time.perf_counter() - t0


def _refused_before_loading(*args) -> str:
    code, lines, seconds = _eval(*args)
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:"), lines  # no "loading ..." line first
    assert seconds < 5, seconds
    return lines[0]


def test_json_out_naming_a_folder_fails_before_loading(stories_dir, tmp_path):
    (tmp_path / "results").mkdir()
    line = _refused_before_loading(stories_dir, *FAST, "--json-out", tmp_path / "results")
    assert f"--json-out {tmp_path / 'results'} is a folder; name a file" in line


def test_plot_without_matplotlib_fails_before_loading(stories_dir, tmp_path, monkeypatch):
    hide_matplotlib(monkeypatch)
    line = _refused_before_loading(stories_dir, *FAST, "--plot", tmp_path / "plots")
    assert "--plot needs matplotlib: pip install 'linearize[eval]'" in line
    assert not (tmp_path / "plots").exists()


def test_a_users_file_survives_and_a_linearize_result_needs_overwrite(stories_dir, tmp_path):
    mine = tmp_path / "mine.json"
    mine.write_text(USER_JSON)
    for extra in ((), ("--overwrite",)):
        line = _refused_before_loading(stories_dir, *FAST, "--json-out", mine, *extra)
        assert "not written by linearize" in line
    assert mine.read_text() == USER_JSON
    theirs_png = tmp_path / "plots" / "mqar.png"  # a PNG in the plot folder that linearize did not write
    theirs_png.parent.mkdir()
    theirs_png.write_bytes(b"\x89PNG\r\n\x1a\nnot ours")
    line = _refused_before_loading(stories_dir, *FAST, "--plot", tmp_path / "plots", "--overwrite")
    assert f"--plot {theirs_png} exists and was not written by linearize" in line

    earlier = write_output_file(tmp_path / "eval.json", marked_json({"summary": []}))
    line = _refused_before_loading(stories_dir, *FAST, "--json-out", earlier)
    assert "holds an earlier linearize result; pass --overwrite" in line
    assert json.loads(earlier.read_text()) == json.loads(marked_json({"summary": []}))
    result = run_eval(EvalConfig(model=str(stories_dir), tasks=["mqar"], mqar_pairs=[2], mqar_samples=1,
                                 json_out=str(earlier), overwrite=True))
    written = json.loads(earlier.read_text())
    assert written["written_by"].startswith("linearize ") and written["summary"] == result["summary"]


def test_results_are_written_before_the_plots(stories_dir, tmp_path):
    """Something takes the plot folder's name while the evaluation runs: the plots fail, naming the file and where
    the results are, and the JSON is already written."""
    json_out, plots = tmp_path / "eval.json", tmp_path / "plots"

    class TakeThePlotFolder:
        def log(self, message: str) -> None:
            if message.startswith("loading"):
                plots.write_text("someone else's file")

        def task(self, name, total, unit=""):
            from linearize.run.progress import QuietProgress

            return QuietProgress().task(name, total, unit)

    cfg = EvalConfig(model=str(stories_dir), tasks=["mqar"], mqar_pairs=[2], mqar_samples=1, json_out=str(json_out),
                     plot=str(plots))
    with pytest.raises(LinearizeError, match=rf"cannot write {plots / 'mqar.png'}: {plots} is a file, not a folder "
                                             rf"\(the results are in {json_out}\)"):
        run_eval(cfg, TakeThePlotFolder())
    assert json.loads(json_out.read_text())["summary"]
    assert plots.read_text() == "someone else's file"


def test_the_cli_refuses_a_bad_output_before_importing_torch(stories_dir, tmp_path):
    """The user's view: the error comes in about a second, not after torch and transformers import (10 s on a busy
    2-core machine), let alone after the models load."""
    import subprocess
    import sys

    from tests.conftest import REPO

    (tmp_path / "results").mkdir()
    code = ("import sys\nfrom linearize.cli.main import main\n"
            f"sys.argv = ['linearize', 'eval', {str(stories_dir)!r}, '--json-out', {str(tmp_path / 'results')!r}]\n"
            "try:\n    main()\nexcept SystemExit as e:\n    print(e.code, 'torch' in sys.modules, 'transformers' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(REPO), timeout=120)
    assert r.stdout.split() == ["2", "False", "False"], (r.stdout, r.stderr[-2000:])
    assert r.stderr.strip().startswith("error: invalid eval settings: --json-out") and len(r.stderr.splitlines()) == 1
