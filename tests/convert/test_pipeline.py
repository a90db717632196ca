"""The conversion pipeline end to end on a tiny saved model: report, resume after a kill, atomic export."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from linearize.convert.pipeline import convert
from linearize.errors import LinearizeError
from tests.conftest import tiny_convert_job


def test_convert_reports_and_exports(tiny_dir, tmp_path):
    out = convert(tiny_convert_job(tiny_dir, tmp_path / "out"), log=lambda m: None)
    report = json.loads((out / "transfer_report.json").read_text())
    assert report["steps"] == 6
    assert report["trained"]["kl"] < report["untrained"]["kl"]
    assert set(report["layer_loss_after"]) == {"0", "1"}  # JSON keys: the layer indices as strings
    # nothing beside the export: no work folder, no lock file, no partial or backup folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.txt", "out", "teacher"]
    with pytest.raises(LinearizeError, match="--overwrite"):
        convert(tiny_convert_job(tiny_dir, out), log=lambda m: None)


def test_kill_and_resume_matches_uninterrupted(tiny_dir, tmp_path):
    ref = convert(tiny_convert_job(tiny_dir, tmp_path / "ref"), log=lambda m: None)
    with pytest.raises(KeyboardInterrupt):
        convert(tiny_convert_job(tiny_dir, tmp_path / "res"), log=lambda m: None, stop_after=4)
    assert not (tmp_path / "res").exists()  # nothing that looks like a finished export
    assert (tmp_path / ".res.work" / "transfer-ckpt").is_dir()
    logs = []
    got = convert(tiny_convert_job(tiny_dir, tmp_path / "res"), log=logs.append)
    assert any("resuming" in m for m in logs)
    assert json.loads((got / "transfer_report.json").read_text())["resumed_from_step"] == 4
    a, b = load_file(str(ref / "model.safetensors")), load_file(str(got / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_changed_settings_do_not_resume_silently(tiny_dir, tmp_path):
    with pytest.raises(KeyboardInterrupt):
        convert(tiny_convert_job(tiny_dir, tmp_path / "o"), log=lambda m: None, stop_after=2)
    with pytest.raises(LinearizeError, match="different settings"):
        convert(tiny_convert_job(tiny_dir, tmp_path / "o", tokens=20 * 32), log=lambda m: None)
