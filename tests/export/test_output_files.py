"""linearize never replaces a result file it did not write (``export.check_output_file``): eval's and bench's
``--json`` / ``--plot(s)`` files. A JSON it writes carries ``"written_by": "linearize X.Y.Z"`` at the top level (a
bench's rows under ``"rows"``), a PNG the same text in its ``Software`` chunk; ``--overwrite`` replaces only those.

Each case with a user's file checks that the file survives, byte for byte. The bench cases run on the CPU: the
outputs are checked before any GPU check, model load or timing.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from linearize import __version__
from linearize.errors import LinearizeError
from linearize.export.writer import (
    check_output_file,
    is_linearize_file,
    marked_json,
    png_metadata,
    result_rows,
    write_output_file,
)
from tests.conftest import USER_JSON, hide_matplotlib


def _user_file(path: Path, text: str = USER_JSON) -> Path:
    path.write_text(text)
    return path


def _png(path: Path, metadata: dict | None) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(1, 1))
    FigureCanvasAgg(fig)
    fig.savefig(path, format="png", metadata=metadata)
    return path


# -- the rule ----------------------------------------------------------------------------------------------------
def test_a_new_file_is_fine_and_a_written_one_is_marked(tmp_path):
    path = check_output_file(tmp_path / "new" / "r.json", overwrite=False, flag="--json")
    write_output_file(path, marked_json([{"a": 1}]))
    data = json.loads(path.read_text())
    assert data == {"written_by": f"linearize {__version__}", "rows": [{"a": 1}]}
    assert next(iter(data)) == "written_by" and result_rows(data) == [{"a": 1}]
    assert result_rows([{"a": 1}]) == [{"a": 1}]  # a bench file written before the marker
    assert is_linearize_file(path)
    assert not list(path.parent.glob(".*partial*"))  # the temporary file is gone


def test_a_users_file_is_never_replaced_overwrite_or_not(tmp_path):
    mine = _user_file(tmp_path / "r.json")
    for overwrite in (False, True):
        with pytest.raises(LinearizeError, match="not written by linearize") as e:
            check_output_file(mine, overwrite=overwrite, flag="--json-out")
        assert "\n" not in str(e.value) and "--json-out" in str(e.value) and str(mine) in str(e.value)
    # a JSON object without the marker, a list of rows, a marker naming another tool: not ours either
    for text in ('{"config": {}, "summary": []}', '[{"model": "teacher"}]', '{"written_by": "other 1.0"}', "\x00\x01"):
        _user_file(mine, text)
        with pytest.raises(LinearizeError, match="not written by linearize"):
            check_output_file(mine, overwrite=True, flag="--json")
    assert mine.read_text() == "\x00\x01"


def test_a_linearize_file_is_replaced_only_with_overwrite(tmp_path):
    path = write_output_file(tmp_path / "r.json", marked_json({"summary": []}))
    with pytest.raises(LinearizeError, match="pass --overwrite"):
        check_output_file(path, overwrite=False, flag="--json-out")
    assert check_output_file(path, overwrite=True, flag="--json-out") == path


def test_a_folder_or_a_file_in_the_way_is_refused(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(LinearizeError, match="is a folder; name a file"):
        check_output_file(tmp_path / "d", overwrite=True, flag="--json-out")
    _user_file(tmp_path / "f")
    with pytest.raises(LinearizeError, match="is a file, not a folder"):
        check_output_file(tmp_path / "f" / "r.json", overwrite=True, flag="--json-out")
    with pytest.raises(LinearizeError, match="is empty"):
        check_output_file("", overwrite=True, flag="--json-out")


def test_pngs_are_told_apart_by_their_software_chunk(tmp_path):
    assert is_linearize_file(_png(tmp_path / "ours.png", png_metadata()))
    theirs = _png(tmp_path / "theirs.png", None)  # matplotlib's own "Software" chunk
    assert not is_linearize_file(theirs)
    with pytest.raises(LinearizeError, match="not written by linearize"):
        check_output_file(theirs, overwrite=True, flag="--plot")


def test_eval_plots_carry_the_marker(tmp_path):
    from linearize.eval.plots import plot_throughput

    rows = [{"model": "teacher", "batch": b, "prompt": 16, "tok_per_s": 10.0 * b} for b in (1, 2)]
    path = plot_throughput({"written_by": "linearize", "rows": rows}, tmp_path / "t.png")  # the marked file form
    assert is_linearize_file(path)


# -- bench: checked first, written marked ------------------------------------------------------------------------
def test_bench_kernels_and_feature_maps_check_json_first(tmp_path):
    from linearize.bench.feature_maps import run_feature_map_bench
    from linearize.bench.kernels import run_kernel_bench

    mine = _user_file(tmp_path / "k.json")
    for run in (run_kernel_bench, run_feature_map_bench):
        with pytest.raises(LinearizeError, match="not written by linearize"):
            run(json_path=str(mine), overwrite=True)  # before the CUDA check: this machine may have no GPU
    assert mine.read_text() == USER_JSON


def test_bench_generate_replaces_only_its_own_json_and_only_with_overwrite(tmp_path, monkeypatch):
    from linearize.bench import generate

    def no_models(*args, **kwargs):
        raise AssertionError("a model was built before the outputs were checked")

    monkeypatch.setattr(generate, "_random_models", no_models)
    earlier = write_output_file(tmp_path / "g.json", marked_json([{"model": "teacher"}]))  # as a bench writes it
    with pytest.raises(LinearizeError, match="pass --overwrite"):
        generate.run_generate_bench(json_path=str(earlier), device="cpu")
    with pytest.raises(AssertionError, match="a model was built"):  # allowed: the run goes on to build the models
        generate.run_generate_bench(json_path=str(earlier), device="cpu", overwrite=True)
    mine = _user_file(tmp_path / "mine.json")
    with pytest.raises(LinearizeError, match="not written by linearize"):
        generate.run_generate_bench(json_path=str(mine), device="cpu", overwrite=True)
    assert mine.read_text() == USER_JSON


def test_bench_sweep_checks_plots_before_any_model_loads(tmp_path, monkeypatch):
    from linearize.bench import sweep

    def no_models(*args, **kwargs):
        raise AssertionError("a model was built before the outputs were checked")

    monkeypatch.setattr(sweep, "_random_models", no_models)
    folder = tmp_path / "plots"
    folder.mkdir()
    theirs = _png(folder / "memory-vs-length.png", None)
    with pytest.raises(LinearizeError, match="memory-vs-length.png exists and was not written by linearize"):
        sweep.run_generate_sweep(device="cpu", plots=folder, overwrite=True)
    theirs.unlink()
    hide_matplotlib(monkeypatch)
    with pytest.raises(LinearizeError, match=r"--plots needs matplotlib: pip install 'linearize\[eval\]'"):
        sweep.run_generate_sweep(device="cpu", plots=folder)


def test_bench_verbs_refuse_a_users_json_in_one_line(tmp_path):
    from typer.testing import CliRunner

    import linearize.cli.main as cli

    mine = _user_file(tmp_path / "mine.json")
    for verb in (["kernels"], ["feature-maps"], ["generate", "--device", "cpu"], ["sweep", "--device", "cpu"]):
        r = CliRunner().invoke(cli.app, ["bench", *verb, "--json", str(mine), "--overwrite"])
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert r.exit_code == 2 and len(lines) == 1, (verb, r.stderr, r.exception)
        assert lines[0] == (f"error: --json {mine} exists and was not written by linearize; linearize never replaces a "
                            "file it did not write, --overwrite or not: choose another --json")
    assert mine.read_text() == USER_JSON
