"""linearize never removes what it did not write: the rules of an export folder (``export.check_export_folder``),
checked by ``convert`` before any weights load, by a recipe's checks and again by ``save_linearized`` itself.

Each case holds a file that must survive. Most run in-process (the rule fires before any heavy work); one CLI run
shows the user's view: one ``error:`` line, exit status 2, the folder as it was.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from linearize.convert.pipeline import check_inputs, convert
from linearize.errors import LinearizeError
from linearize.export.writer import check_export_folder, is_linearize_export, save_linearized
from tests.conftest import linear_config, one_error_line, run_cli, tiny_convert_job


def _user_folder(path: Path) -> Path:
    """A folder of the user's: a note and a source tree."""
    (path / "src").mkdir(parents=True)
    (path / "notes.txt").write_text("my notes")
    (path / "src" / "main.py").write_text("print('hi')")
    return path


def _intact(path: Path) -> None:
    assert (path / "notes.txt").read_text() == "my notes"
    assert (path / "src" / "main.py").read_text() == "print('hi')"


def _linearized():
    from linearize.convert.surgery import linearize_model
    from tests.conftest import tiny_model

    return linearize_model(tiny_model("llama"), linear_config(window=4))


@pytest.fixture(scope="module")
def an_export(tmp_path_factory) -> Path:
    """A finished linearize export (tiny random Llama, no training)."""
    out = tmp_path_factory.mktemp("exports") / "export"
    save_linearized(_linearized(), out)
    assert is_linearize_export(out)
    return out


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_folder_linearize_did_not_write_is_refused(tiny_dir, tmp_path, overwrite):
    mine = _user_folder(tmp_path / "myproject")
    with pytest.raises(LinearizeError, match="not a linearize export") as e:
        check_inputs(_job(tiny_dir, mine, overwrite))
    assert "notes.txt" in str(e.value) and "src" in str(e.value)
    _intact(mine)


def _job(tiny_dir, out, overwrite):
    from dataclasses import replace

    return replace(tiny_convert_job(tiny_dir, out, tokens=0), overwrite=overwrite)


def test_a_folder_of_exports_is_not_an_export(tiny_dir, tmp_path, an_export):
    import shutil

    runs = tmp_path / "runs"
    for name in ("a", "b"):
        shutil.copytree(an_export, runs / name)
    with pytest.raises(LinearizeError, match="holding other files \\(a, b\\)"):
        check_inputs(_job(tiny_dir, runs, overwrite=True))
    assert is_linearize_export(runs / "a") and is_linearize_export(runs / "b")


@pytest.mark.parametrize("name", ["", "."])
def test_the_working_directory_is_refused(tiny_dir, tmp_path, monkeypatch, name):
    work = _user_folder(tmp_path / "cwd")
    monkeypatch.chdir(work)
    with pytest.raises(LinearizeError, match="empty|working directory"):
        check_export_folder(name, overwrite=True)
    with pytest.raises(LinearizeError, match="working directory"):
        check_export_folder(Path(name), overwrite=True)  # Path("") is "."
    _intact(work)


def test_a_folder_holding_the_working_directory_is_refused(tmp_path, monkeypatch):
    (tmp_path / "a" / "b").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "a" / "b")
    with pytest.raises(LinearizeError, match="working directory or holds it"):
        check_export_folder("..", overwrite=True)
    with pytest.raises(LinearizeError, match="working directory or holds it"):
        check_export_folder(tmp_path / "a", overwrite=True)


def test_the_source_and_a_folder_holding_it_are_refused(tiny_dir, tmp_path):
    before = sorted(p.name for p in tiny_dir.iterdir())
    for out, word in ((tiny_dir, "is"), (tiny_dir.parent, "holds")):
        with pytest.raises(LinearizeError, match=f"{word} the source model"):
            check_inputs(_job(tiny_dir, out, overwrite=True))
    assert sorted(p.name for p in tiny_dir.iterdir()) == before


def test_an_export_needs_overwrite_and_an_empty_folder_does_not(tiny_dir, tmp_path, an_export):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(an_export, out)
    with pytest.raises(LinearizeError, match="already holds a linearize export; pass --overwrite"):
        check_inputs(_job(tiny_dir, out, overwrite=False))
    check_inputs(_job(tiny_dir, out, overwrite=True))
    (tmp_path / "empty").mkdir()
    check_inputs(_job(tiny_dir, tmp_path / "empty", overwrite=False))


def test_save_linearized_itself_never_replaces_a_user_folder(tmp_path, an_export):
    """The last guard: even asked to overwrite, the writer refuses a folder it did not write; replacing an export
    leaves a user's look-alike backup name alone."""
    model = _linearized()
    mine = _user_folder(tmp_path / "mine")
    with pytest.raises(LinearizeError, match="not a linearize export"):
        save_linearized(model, mine, overwrite=True)
    _intact(mine)
    out = tmp_path / "out"
    save_linearized(model, out)
    lookalike = _user_folder(tmp_path / ".out.old")
    save_linearized(model, out, overwrite=True)
    assert is_linearize_export(out)
    _intact(lookalike)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.old", "mine", "out"]


def test_a_work_folder_linearize_did_not_write_survives(tiny_dir, tmp_path):
    mine = _user_folder(tmp_path / ".o.work")
    with pytest.raises(LinearizeError, match="not a linearize work folder"):
        convert(_job(tiny_dir, tmp_path / "o", overwrite=True))
    _intact(mine)


def test_a_recipe_whose_export_folder_is_a_user_folder(tmp_path):
    from linearize.recipes import Recipe, check_recipe_paths

    out = tmp_path / "run"
    _user_folder(out / "finetuned")
    recipe = Recipe.model_validate({"model": {"source": str(tmp_path / "teacher")}, "output": str(out),
                                    "overwrite": True})
    (tmp_path / "teacher").mkdir()
    with pytest.raises(LinearizeError, match="finetuned is a folder holding other files"):
        check_recipe_paths(recipe)
    _intact(out / "finetuned")


def test_cli_out_into_a_user_folder_keeps_it(tiny_dir, tmp_path):
    """The reported case: `convert MODEL --out myproject --tokens 0` replaced myproject (exit 0)."""
    mine = _user_folder(tmp_path / "myproject")
    line = one_error_line(run_cli("convert", tiny_dir, "--out", "myproject", "--tokens", 0, "--overwrite",
                                   cwd=tmp_path))
    assert "myproject" in line and "not a linearize export" in line
    _intact(mine)
    assert sorted(os.listdir(tmp_path)) == sorted(["myproject", "teacher", "data.txt"])


def test_the_lock_file_goes_with_the_run_and_a_waiter_relocks(tmp_path):
    import fcntl

    from linearize.run.locking import _same_file, lock_path, output_lock

    out = tmp_path / "o"
    with output_lock(out):
        assert lock_path(out).read_text().strip() == str(os.getpid())
        waiter = os.open(lock_path(out), os.O_RDWR)  # a second run that opened the file and waits for the lock
        with pytest.raises(LinearizeError, match="another linearize run"):
            with output_lock(out):
                pass
    assert not lock_path(out).exists()  # nothing left beside the output
    fcntl.flock(waiter, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the waiter gets the old file's lock...
    assert not _same_file(waiter, lock_path(out))  # ...and sees it is no longer the lock at the path
    os.close(waiter)
    lock_path(out).write_text("my file\n")
    with pytest.raises(LinearizeError, match="not a linearize lock file"):
        with output_lock(out):
            pass
    assert lock_path(out).read_text() == "my file\n"
