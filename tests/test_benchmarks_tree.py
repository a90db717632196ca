"""benchmarks/ stays a tidy tree (#26): no script edits ``sys.path`` or puts the working tree on ``PYTHONPATH``
(scripts run from the installed package, ``pip install -e .``), and every script is named in benchmarks/README.md
with its folder, so that the README says what each one is for."""

import re
from pathlib import Path

from tests.conftest import REPO

BENCH = REPO / "benchmarks"
SYS_PATH = re.compile(r"\bsys\.path\b")
TREE_ON_PYTHONPATH = re.compile(r"PYTHONPATH=[^\s;]*(\$PWD|\$\(pwd\)|(^|:)\.(:|\s|$))")


def scripts(root: Path = BENCH) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.suffix in (".py", ".sh") and "results" not in p.parts)


def path_edits(root: Path = BENCH) -> list[str]:
    """``file:line`` of every sys.path edit (.py) or working tree put on PYTHONPATH (.sh) under root."""
    found = []
    for p in scripts(root):
        pattern = SYS_PATH if p.suffix == ".py" else TREE_ON_PYTHONPATH
        found += [f"{p.relative_to(root)}:{i}" for i, line in enumerate(p.read_text().splitlines(), 1)
                  if pattern.search(line)]
    return found


def unnamed(root: Path = BENCH) -> list[str]:
    """Scripts under root whose path relative to it (``sessions/x.sh``, ``y.py``) the README does not name."""
    readme = (root / "README.md").read_text() if (root / "README.md").is_file() else ""
    names = set(re.findall(r"[\w./-]+\.(?:py|sh)\b", readme))
    return [str(p.relative_to(root)) for p in scripts(root) if str(p.relative_to(root)) not in names]


def test_no_benchmark_script_edits_the_import_path():
    assert path_edits() == [], "import linearize from the installed package (pip install -e .) instead"


def test_every_benchmark_script_is_in_the_readme():
    assert scripts(), "benchmarks/ has no scripts: the test reads the wrong folder"
    assert unnamed() == [], "name each script in benchmarks/README.md (what for, command, needs, results)"


def test_the_checks_catch_a_planted_path_edit_and_an_unnamed_script(tmp_path):
    (tmp_path / "sessions").mkdir()
    (tmp_path / "ok.py").write_text("import linearize\n")
    (tmp_path / "hack.py").write_text("import sys\nsys.path.insert(0, '.')\n")
    (tmp_path / "sessions" / "run.sh").write_text("export PYTHONPATH=/tmp/site:$PWD\n")
    (tmp_path / "sessions" / "fine.sh").write_text("export PYTHONPATH=/tmp/site\n")
    (tmp_path / "README.md").write_text("`ok.py`, `hack.py`, `sessions/run.sh` and fine.sh\n")
    assert path_edits(tmp_path) == ["hack.py:2", "sessions/run.sh:1"]
    assert unnamed(tmp_path) == ["sessions/fine.sh"]  # named without its folder
