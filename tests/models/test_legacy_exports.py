"""Exports written by an earlier linearize still load, with the same logits: a full, a delta and a --no-merge export
made at commit a4ca44a (before the package's folders moved; tests/fixtures/legacy_exports/make.py) are kept as
they were written, and load registered (``import linearize``) and through their remote-code shim."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO

LEGACY = REPO / "tests" / "fixtures" / "legacy_exports"
REFERENCE = load_file(str(LEGACY / "logits.safetensors"))


def _logits(path, *, remote_code: bool):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=remote_code).eval()
    if (path / "adapter").is_dir():
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(path / "adapter")).eval()
    with torch.no_grad():
        return model(input_ids=REFERENCE["ids"], use_cache=False).logits


@pytest.mark.parametrize("name", ["full", "delta", "no-merge"])
def test_a_legacy_export_loads_registered_with_its_logits(name, monkeypatch):
    import linearize  # noqa: F401  (registers the classes)

    monkeypatch.chdir(LEGACY)  # the delta export names its base by the relative path "teacher"
    got = _logits(LEGACY / name, remote_code=False)
    torch.testing.assert_close(got, REFERENCE["no-merge" if name == "no-merge" else "full"], rtol=0, atol=1e-6)


def test_legacy_exports_load_through_their_remote_code_shim(tmp_path):
    """A fresh interpreter that never imports linearize itself: each export's own modeling_linearize.py does."""
    script = (
        "import sys, torch\n"
        "sys.path.insert(0, sys.argv[1])\n"  # the tests package, for _logits; linearize is not imported here
        "from tests.models.test_legacy_exports import LEGACY, _logits\n"
        "assert 'linearize' not in sys.modules\n"
        "from safetensors.torch import save_file\n"
        "save_file({n: _logits(LEGACY / n, remote_code=True).contiguous() for n in ('full', 'delta', 'no-merge')},"
        " sys.argv[2])\n"
    )
    out = tmp_path / "logits.safetensors"
    r = subprocess.run([sys.executable, "-c", script, str(REPO), str(out)], cwd=str(LEGACY), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    got = load_file(str(out))
    for name in ("full", "delta", "no-merge"):
        torch.testing.assert_close(got[name], REFERENCE["no-merge" if name == "no-merge" else "full"], rtol=0,
                                   atol=1e-6)
