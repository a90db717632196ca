"""LoRA finetuning on tiny random linearized models: merged export == unmerged adapter; kill + resume ==
uninterrupted; the shared teacher is the exact softmax teacher; LoRA targets per architecture; the whole recipe
pipeline (already-linearized source, text data, KD, no-merge export)."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from linearize.errors import ConfigError, LinearizeError
from linearize.export.writer import save_linearized
from linearize.finetune.config import FinetuneConfig, LoRAConfig
from linearize.finetune.lora import apply_lora, resolve_targets
from linearize.finetune.pipeline import run_recipe
from linearize.finetune.teacher import shared_teacher
from linearize.recipes import load_recipe
from linearize.run.loop import lr_factor
from tests.conftest import tiny_model
from tests.finetune.conftest import VOCAB, char_tokenizer, linearized


def _randomize_lora(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.mark.parametrize("family,attn", [("llama", dict(window=8)), ("gpt2", dict(window=0)),
                                         ("qwen2", dict(window=4, feature_map="based"))])
def test_merged_export_equals_unmerged_adapter(tmp_path, family, attn):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = linearized(family, **attn)
    peft_model = apply_lora(model, LoRAConfig(rank=4, alpha=8), train_feature_maps=False, seed=0)
    _randomize_lora(peft_model)
    peft_model.eval()
    ids = torch.randint(0, VOCAB, (2, 21))
    with torch.no_grad():
        ref = peft_model(input_ids=ids, use_cache=False).logits
        with peft_model.disable_adapter():
            base_logits = peft_model(input_ids=ids, use_cache=False).logits
    assert (ref - base_logits).abs().max() > 1e-3  # the adapter really changes the output

    # --no-merge layout: base export + adapter/ folder
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    merged = peft_model.merge_and_unload()
    save_linearized(merged, tmp_path / "merged")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not any("lora" in n for n, _ in loaded.named_parameters())
    with torch.no_grad():
        got = loaded(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)

    base = linearized(family, **attn)  # same seed: identical base weights and feature maps
    reloaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids, use_cache=False).logits, ref, atol=1e-5, rtol=0)


def test_shared_teacher_is_the_softmax_teacher():
    teacher = tiny_model("llama", vocab_size=VOCAB)
    ids = torch.randint(0, VOCAB, (2, 19))
    with torch.no_grad():
        ref = teacher(input_ids=ids, use_cache=False).logits
    student = linearized("llama", window=4, softmax_layers=[1])
    peft_model = apply_lora(student, LoRAConfig(), train_feature_maps=False, seed=0)
    _randomize_lora(peft_model)
    peft_model.train()
    with torch.no_grad(), shared_teacher(peft_model):
        got = peft_model(input_ids=ids, use_cache=False).logits
        assert not peft_model.training
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert peft_model.training  # restored, and the student is linear again
    with torch.no_grad():
        assert (peft_model(input_ids=ids, use_cache=False).logits - ref).abs().max() > 1e-3


def test_lora_targets():
    gpt2 = linearized("gpt2", window=0)
    assert resolve_targets(gpt2, None) == ["attn.c_attn", "attn.c_proj"]
    peft_model = apply_lora(gpt2, LoRAConfig(), train_feature_maps=True, seed=0)
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in peft_model.named_parameters() if "lora_A" in n}
    assert adapted and all(".attn." in n for n in adapted)  # the MLP's own c_proj is left alone
    assert peft_model.peft_config["default"].fan_in_fan_out
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert any(".linear_attn." in n for n in trainable)
    with pytest.raises(ConfigError, match=r"\['qkv'\] match no linear layer.*candidates.*q_proj"):
        resolve_targets(linearized("llama"), ["q_proj", "qkv"])


def test_feature_maps_frozen_by_default():
    peft_model = apply_lora(linearized("llama", window=8), LoRAConfig(), train_feature_maps=False, seed=0)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_schedule():
    cfg = FinetuneConfig(warmup=0.1, min_lr_frac=0.1, tokens=10**6)
    f = [lr_factor(s, 100, cfg) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0) and max(f) == pytest.approx(1.0)
    assert f[-1] == pytest.approx(0.1, abs=1e-3) and all(a >= b for a, b in zip(f[9:], f[10:]))
    const = FinetuneConfig(warmup=0.0, schedule="constant", tokens=10**6)
    assert {lr_factor(s, 50, const) for s in range(50)} == {1.0}


# ---------------------------------------------------------------------------------------------------------------
# The recipe pipeline on a tiny linearized export with a character-level tokenizer and a text file
# ---------------------------------------------------------------------------------------------------------------
def test_kill_and_resume_equals_uninterrupted(tiny_run):
    tmp, write = tiny_run
    path = write()
    a = run_recipe(load_recipe(path, ["output=" + str(tmp / "a")]), no_merge=True, log=lambda m: None)
    recipe_b = load_recipe(path, ["output=" + str(tmp / "b")])
    with pytest.raises(KeyboardInterrupt, match="stopped after 2 of 6 steps"):
        run_recipe(recipe_b, no_merge=True, log=lambda m: None, stop_after=2)
    assert (tmp / "b" / ".finetuned.work" / "ckpt" / "state.safetensors").is_file()
    logs = []
    b = run_recipe(recipe_b, no_merge=True, log=logs.append)  # a "new process": everything reloaded from disk
    assert any("resuming finetuning at step 2" in m for m in logs)
    wa = load_file(str(a / "adapter" / "adapter_model.safetensors"))
    wb = load_file(str(b / "adapter" / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys() and wa
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=1e-6, rtol=0)
    ra, rb = (json.loads((p / "finetune_report.json").read_text()) for p in (a, b))
    assert rb["resumed_from_step"] == 2 and ra["steps"] == rb["steps"] == 6
    assert ra["train_loss"] == pytest.approx(rb["train_loss"], abs=1e-5)
    assert not (tmp / "b" / ".finetuned.work").exists()  # work folder removed once the export is complete


def test_pipeline_lowers_validation_loss_and_exports(tiny_run):
    from transformers import AutoModelForCausalLM

    tmp, write = tiny_run
    path = write(tokens=8 * 64 * 12, kd=None, lora={"rank": 8})
    out = run_recipe(load_recipe(path), log=lambda m: None)
    report = json.loads((out / "finetune_report.json").read_text())
    assert report["after"]["valid"]["loss"] < report["before"]["valid"]["loss"]
    assert report["teacher_metrics"]["valid"]["loss"] > 0 and report["steps"] == 12 and report["merged"]
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "LinearizedLlamaForCausalLM"
    assert not any("lora" in n for n, _ in model.named_parameters())
    # a finished export is not overwritten silently
    with pytest.raises(LinearizeError, match="overwrite=true"):
        run_recipe(load_recipe(path), log=lambda m: None)


def test_changed_settings_do_not_resume_silently(tiny_run):
    tmp, write = tiny_run
    with pytest.raises(KeyboardInterrupt):
        run_recipe(load_recipe(write()), log=lambda m: None, stop_after=1)
    with pytest.raises(LinearizeError, match="other settings"):
        run_recipe(load_recipe(write(), ["finetune.lr=1e-3"]), log=lambda m: None)


def test_ddp_two_processes_equal_one(tiny_run):
    """torchrun with 2 CPU processes (gloo DDP through accelerate) trains to the same adapter as 1 process: the
    global batch order does not depend on the number of processes."""
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    tmp, write = tiny_run
    path = write(lora={"rank": 4, "dropout": 0.0}, kd=None)
    outs = {}
    for n in (1, 2):
        out = tmp / f"ddp{n}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n), "-m",
               "linearize.finetune",
               str(path), "--no-merge", "--set", f"output={out}", "--set", "model.device=cpu"]
        r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert r.returncode == 0, r.stderr[-3000:]
        outs[n] = out / "finetuned"
    assert json.loads((outs[2] / "finetune_report.json").read_text())["processes"] == 2
    w1, w2 = (load_file(str(o / "adapter" / "adapter_model.safetensors")) for o in (outs[1], outs[2]))
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], atol=1e-5, rtol=1e-4)


def test_ddp_conversion_inside_finetune_splits_the_transfer_and_equals_one_process(tiny_run):
    """A recipe whose source is a softmax teacher: under torchrun every process takes part in stage 1 (its batches
    split over them), and both stages end where one process ends."""
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    tmp, _ = tiny_run
    teacher = tiny_model("llama", vocab_size=VOCAB)
    teacher.save_pretrained(tmp / "teacher")
    char_tokenizer().save_pretrained(tmp / "teacher")
    recipe = {
        "model": {"source": str(tmp / "teacher"), "device": "cpu"},
        "convert": {"window": 4, "sinks": 0, "data": str(tmp / "data.txt"), "tokens": 4 * 64 * 4, "seq_len": 64,
                    "batch_size": 4, "val_tokens": 4 * 64, "checkpoint_every": 0},
        "finetune": {"data": str(tmp / "data.txt"), "tokens": 8 * 64 * 2, "seq_len": 64, "batch_size": 8,
                     "micro_batch_size": 4, "checkpoint_every": 0, "lora": {"rank": 4, "dropout": 0.0}},
        "output": str(tmp / "unused"),
    }
    path = tmp / "convert-recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    outs = {}
    for n in (1, 2):
        out = tmp / f"ddpconv{n}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n), "-m",
               "linearize.finetune",
               str(path), "--no-merge", "--set", f"output={out}"]
        r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert r.returncode == 0, r.stderr[-3000:]
        outs[n] = out
    assert json.loads((outs[2] / "converted" / "transfer_report.json").read_text())["processes"] == 2
    for rel in ("converted/model.safetensors", "finetuned/adapter/adapter_model.safetensors"):
        w1, w2 = (load_file(str(o / rel)) for o in (outs[1], outs[2]))
        keys = [k for k in w1 if "linear_attn" in k or "lora" in k]
        assert keys
        for k in keys:
            torch.testing.assert_close(w2[k], w1[k], atol=1e-5, rtol=1e-4)


def test_ctrl_c_with_checkpoint_every_0_saves_and_resumes_equal(tiny_run, sigint_default):
    """finetune.checkpoint_every: 0 means "only when interrupted": Ctrl-C finishes the step, checkpoints, raises
    Interrupted; rerunning ends with the uninterrupted run's adapter."""
    import signal

    from linearize.run.checkpoint import Interrupted

    tmp, write = tiny_run
    path = write()  # checkpoint_every: 0
    a = run_recipe(load_recipe(path, ["output=" + str(tmp / "a")]), no_merge=True, log=lambda m: None)

    def ctrl_c_at_step_2(step, total, loss, tps):
        if step == 2:
            signal.raise_signal(signal.SIGINT)

    recipe_b = load_recipe(path, ["output=" + str(tmp / "b")])
    with pytest.raises(Interrupted, match="stopped after step 2 of 6; checkpoint saved"):
        run_recipe(recipe_b, no_merge=True, log=lambda m: None, on_step=ctrl_c_at_step_2)
    logs = []
    b = run_recipe(recipe_b, no_merge=True, log=logs.append)
    assert any("resuming finetuning at step 2" in m for m in logs)
    wa = load_file(str(a / "adapter" / "adapter_model.safetensors"))
    wb = load_file(str(b / "adapter" / "adapter_model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=1e-6, rtol=0)
