"""Exports stay loadable wherever they go: a re-saved export (save_pretrained / push_to_hub's files) loads both ways
in a fresh interpreter; a moved --no-merge folder loads with its own base (named "."); the remote-code shim says how
to install linearize, by package name and version; exports name local teachers by name, never by path; every file
gets normal modes. (tests/export/test_shareable_export.py: the model card and what an upload holds.)"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys

import pytest
import torch

from linearize.convert.surgery import linearize_model
from linearize.export.writer import save_linearized
from tests.conftest import REPO, linear_config, tiny_model

LOGITS_SCRIPT = r"""
import json, sys, torch
mode, path, ids = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
from transformers import AutoModelForCausalLM
if mode == "registered":
    import linearize  # noqa: F401
    model = AutoModelForCausalLM.from_pretrained(path)
elif mode == "remote_code":
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
elif mode == "resave_remote_code":  # load with remote code only, re-save, and load the re-saved folder
    AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).save_pretrained(sys.argv[4])
    model = AutoModelForCausalLM.from_pretrained(sys.argv[4], trust_remote_code=True)
elif mode == "peft_auto":
    from peft import AutoPeftModelForCausalLM
    model = AutoPeftModelForCausalLM.from_pretrained(path, trust_remote_code=True)
elif mode == "peft_base_plus_adapter":
    import os
    from peft import PeftModel
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True),
                                      os.path.join(path, "adapter"))
model.eval()
with torch.no_grad():
    print(json.dumps(model(torch.tensor(ids), use_cache=False).logits.flatten().tolist()))
"""


def _logits_in_subprocess(mode, path, ids, *extra, cwd=None):
    r = subprocess.run([sys.executable, "-c", LOGITS_SCRIPT, mode, str(path), json.dumps(ids.tolist()), *map(str, extra)],
                       capture_output=True, text=True, cwd=str(cwd or REPO), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return torch.tensor(json.loads(r.stdout.strip().splitlines()[-1]))


@pytest.fixture
def export(tmp_path):
    model = linearize_model(tiny_model("llama"), linear_config(window=8), teacher="tiny-llama")
    ids = torch.randint(1, 96, (1, 13))
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits.flatten()
    return save_linearized(model, tmp_path / "export"), ids, ref


@pytest.mark.parametrize("loader", ["registered", "remote_code"])
def test_resaved_export_loads_both_ways(export, tmp_path, loader):
    """save_pretrained of a loaded export writes the shim its auto_map names (it used to drop it)."""
    from transformers import AutoModelForCausalLM

    out, ids, ref = export
    if loader == "registered":
        import linearize  # noqa: F401

        model = AutoModelForCausalLM.from_pretrained(out)
    else:
        model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    resaved = tmp_path / "resaved"
    model.save_pretrained(resaved)
    assert (resaved / "modeling_linearize.py").read_text() == (out / "modeling_linearize.py").read_text()
    for mode in ("remote_code", "registered"):
        assert torch.equal(_logits_in_subprocess(mode, resaved, ids), ref), mode


def test_resave_inside_a_remote_code_only_process(export, tmp_path):
    out, ids, ref = export
    assert torch.equal(_logits_in_subprocess("resave_remote_code", out, ids, tmp_path / "r2"), ref)
    assert (tmp_path / "r2" / "modeling_linearize.py").is_file()


def test_config_save_alone_writes_the_shim(export, tmp_path):
    from transformers import AutoConfig

    import linearize  # noqa: F401

    out, _, _ = export
    AutoConfig.from_pretrained(out).save_pretrained(tmp_path / "cfg")
    cfg = json.loads((tmp_path / "cfg" / "config.json").read_text())
    assert cfg["auto_map"]["AutoConfig"] == "modeling_linearize.LinearizedLlamaConfig"
    assert (tmp_path / "cfg" / "modeling_linearize.py").is_file()


def test_shim_without_linearize_installed_says_how_to_install(export):
    """With linearize not importable, trust_remote_code loading fails with our message, not transformers'
    "Run `pip install linearize`" (no such package on PyPI)."""
    out, _, _ = export
    script = ("import sys; sys.modules['linearize'] = None\n"  # as if the package were not installed
              "from transformers import AutoModelForCausalLM\n"
              f"AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)\n")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=str(out.parent), timeout=300)
    from linearize import __version__

    assert r.returncode != 0
    hint = [line for line in r.stderr.splitlines() if line.startswith("ImportError:")][-1]
    assert hint.endswith(f"install it with: pip install linearize=={__version__}")  # was: pip install /local/path
    assert "/" not in hint and "Run `pip install linearize`" not in r.stderr


def test_export_folder_has_normal_modes(export):
    """The modes a plain save_pretrained gives under the umask, for the folder and every file in it."""
    out, _, _ = export
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~mask  # was 0700 (mkdtemp)
    files = sorted(p.name for p in out.iterdir())
    assert "model.safetensors" in files and "README.md" in files
    for name in files:  # model.safetensors was 0600
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o666 & ~mask, name


def test_no_merge_folder_names_itself_as_base_and_survives_a_move(tmp_path):
    """A --no-merge export's adapter names the export itself as its base (with the feature maps it was trained
    with) as ".", no path: the folder copied elsewhere -- original deleted -- loads to identical logits, with
    AutoPeftModelForCausalLM from inside it and with PeftModel from anywhere."""
    from linearize.finetune.config import LoRAConfig
    from linearize.finetune.lora import apply_lora

    model = linearize_model(tiny_model("llama", vocab_size=128), linear_config(window=4), teacher="t")
    peft_model = apply_lora(model, LoRAConfig(rank=4, alpha=8), train_feature_maps=True, seed=0)
    with torch.no_grad():  # a trained adapter and trained feature maps (both differ from the source)
        for n, p in peft_model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.2)
    peft_model.eval()
    ids = torch.randint(0, 128, (1, 11))
    with torch.no_grad():
        ref = peft_model(input_ids=ids, use_cache=False).logits.flatten()
    peft_model.save_pretrained(str(tmp_path / "adapter_tmp"))
    out = save_linearized(peft_model.unload(), tmp_path / "ft", adapter_dir=tmp_path / "adapter_tmp")
    adapter_cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == "."  # was the export's absolute path

    copy = tmp_path / "elsewhere" / "ft-copy"
    shutil.copytree(out, copy)
    shutil.rmtree(out)
    assert str(tmp_path) not in "".join(p.read_text() for p in (copy / "adapter").glob("*.json"))
    assert torch.allclose(_logits_in_subprocess("peft_auto", "adapter", ids, cwd=copy), ref, atol=1e-6)
    assert torch.allclose(_logits_in_subprocess("peft_base_plus_adapter", copy, ids), ref, atol=1e-6)


def test_runs_compare_teachers_by_absolute_path_and_exports_name_them(tmp_path, monkeypatch):
    """A resumed run compares its settings by absolute path (model_reference); an export records a local teacher
    as ``local:<name>`` (portable_reference) and a hub id as it is."""
    from linearize.io.loading import model_reference
    from linearize.io.portable import loadable_reference, portable_reference

    (tmp_path / "teacher").mkdir()
    (tmp_path / "m.gguf").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    assert model_reference("teacher") == model_reference("./teacher/") == str(tmp_path / "teacher")
    assert portable_reference("teacher") == portable_reference(str(tmp_path / "teacher") + "/") == "local:teacher"
    assert portable_reference("m.gguf") == "local:m.gguf" and portable_reference("/gone/away") == "local:away"
    for hub_id in ("HuggingFaceTB/SmolLM2-135M-Instruct", "gpt2"):
        assert model_reference(hub_id) == portable_reference(hub_id) == loadable_reference(hub_id) == hub_id
    assert loadable_reference("local:teacher") is None
